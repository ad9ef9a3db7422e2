#!/usr/bin/env bash
# Instructions a pushcluster binary executes per delivered room message,
# counted by callgrind (repeatable on a shared machine, unlike time):
# two runs that differ only in how many pushes they send, so start-up,
# connections and shutdown cancel out.
#
#   bench/callgrind-per-message.sh target/release/pushcluster
#
# Needs valgrind, pushcluster-bench next to the binary (or BENCH=...), and
# ports 3101-3111 and 3190 free. TRANSPORT=ws for WebSocket clients,
# CONFIG=FILE for the server's --config.
set -euo pipefail

bin="${1:?usage: $0 PUSHCLUSTER_BINARY}"
bench="${BENCH:-$(dirname "$bin")/pushcluster-bench}"
clients="${CLIENTS:-200}"
rate="${RATE:-20}"
transport="${TRANSPORT:-tcp}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Instructions (Ir) of one server run that gets `seconds` of room pushes.
run() {
    local seconds="$1" out="$work/callgrind.$1"
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$bin" standalone --log-level warn ${CONFIG:+--config "$CONFIG"} >"$work/server.$seconds.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do
        curl -sf -o /dev/null http://127.0.0.1:3190/readyz && break
        sleep 0.1
    done
    "$bench" room --transport "$transport" --connections "$clients" --rooms 1 --rate "$rate" --concurrency 1 \
        --duration "$seconds" --settle 10 --connect-rate 100 --quiet --json >"$work/bench.$seconds.json"
    kill "$pid"
    wait "$pid" || true
    local instructions received
    instructions=$(grep -m1 -E '^(summary|totals):' "$out" | awk '{print $2}')
    received=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["messages_lost"]==0, d; print(d["messages_received"])' "$work/bench.$seconds.json")
    echo "$instructions $received"
}

read -r short_ir short_msgs < <(run 5)
read -r long_ir long_msgs < <(run 15)
python3 - "$short_ir" "$short_msgs" "$long_ir" "$long_msgs" <<'EOF'
import sys
short_ir, short_msgs, long_ir, long_msgs = map(int, sys.argv[1:])
per = (long_ir - short_ir) / (long_msgs - short_msgs)
print(f"runs: {short_msgs} and {long_msgs} messages delivered")
print(f"instructions per delivered message: {per:,.0f}")
EOF
