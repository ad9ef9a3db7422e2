#!/usr/bin/env bash
# Runs Sockudo (a Rust Pusher-protocol server) the way docs/benchmarks.md
# measures it: in-memory everything, one app whose limits do not get in the
# benchmark's way. Install it first (about 12 minutes cold):
#   apt-get install -y protobuf-compiler libprotobuf-dev
#   cargo install sockudo --root /opt/sockudo
# Usage: bench/run-sockudo.sh [PORT]   (default 6001; its metrics listen on 127.0.0.1:9601;
#        SOCKUDO_BIN overrides the binary)
set -euo pipefail

port="${1:-6001}"
bin="${SOCKUDO_BIN:-$(command -v sockudo || echo /opt/sockudo/bin/sockudo)}"
if [[ ! -x "$bin" ]]; then
    echo "sockudo not found (set SOCKUDO_BIN or install it: cargo install sockudo)" >&2
    exit 1
fi

# Its defaults allow 100 connections and 100 backend events/s per app and
# rate-limit the HTTP API (429s); a benchmark needs them out of the way.
export ADAPTER_DRIVER=local CACHE_DRIVER=memory APP_MANAGER_DRIVER=memory QUEUE_DRIVER=memory
export SOCKUDO_DEFAULT_APP_ENABLED=true
export SOCKUDO_DEFAULT_APP_ID=bench
export SOCKUDO_DEFAULT_APP_KEY=bench-key
export SOCKUDO_DEFAULT_APP_SECRET=bench-secret
export SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=1000000
export SOCKUDO_DEFAULT_APP_MAX_BACKEND_EVENTS_PER_SECOND=1000000
export RATE_LIMITER_ENABLED=false
export HOST=127.0.0.1 PORT="$port"
export METRICS_HOST=127.0.0.1
export RUST_LOG="${RUST_LOG:-warn}"
exec "$bin"
