#!/usr/bin/env bash
# Runs the benchmark matrix of docs/benchmarks.md: pushcluster standalone
# (goim TCP and WebSocket clients), Sockudo (Pusher WebSocket clients) and,
# when NATS_SERVER_BIN names a nats-server, the distributed fleet — the same
# scenarios, each against a freshly started server (so RSS growth is not
# flattered by memory an earlier run left in the allocator), RUNS times.
# Every run's JSON summary goes to $OUT/<target>.<scenario>.<run>.json;
# bench/summarize.py prints the medians.
#
#   cargo build --release -p pushcluster -p pushcluster-bench
#   bench/compare.sh                       # all targets, RUNS=3
#   TARGETS="pushcluster-tcp sockudo" SCENARIOS="idle lone" RUNS=1 bench/compare.sh
#
# Needs: ulimit -n 20000 (the generator's workers and the servers each hold
# up to ~19,000 sockets), ports 3101-3119, 3190-3192, 4333, 6001-6100 free.
set -euo pipefail

cd "$(dirname "$0")/.."
bin="${BIN:-target/release}"
runs="${RUNS:-3}"
out="${OUT:-bench-results/$(date +%Y%m%d-%H%M%S)}"
max="${MAX_CONNECTIONS:-19000}"
targets="${TARGETS:-pushcluster-tcp pushcluster-ws sockudo distributed-tcp}"
scenarios="${SCENARIOS:-idle lone room-40 room-closed-1k room-closed-10k room-closed-max churn}"
mkdir -p "$out"

server_pids=()
sockudo_port=6000
workdir="$(mktemp -d)"
stop_servers() {
    for pid in "${server_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${server_pids[@]}"; do
        # Sockudo and pushcluster drain politely; wait so the ports are free.
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -9 "$pid" 2>/dev/null; then
            echo "  server $pid did not stop in 10 s; killed. Its log ends:" >&2
            tail -3 "$workdir"/*.log >&2 || true
        fi
    done
    server_pids=()
}
trap 'stop_servers; rm -rf "$workdir"' EXIT

wait_http() {
    for _ in $(seq 600); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.05
    done
    echo "not ready: $1" >&2
    return 1
}

# Starts the target's server(s); sets `bench_args` (protocol, transport,
# --pid of the process holding the connections).
start_target() {
    case "$1" in
    pushcluster-tcp | pushcluster-ws)
        "$bin/pushcluster" standalone >"$workdir/server.log" 2>&1 &
        server_pids+=("$!")
        wait_http http://127.0.0.1:3190/readyz || return 1
        bench_args=(--transport "${1#pushcluster-}" --pid "${server_pids[0]}")
        ;;
    sockudo)
        # A fresh port each start: Sockudo does not set SO_REUSEADDR, so its
        # port stays taken while the last run's sockets are in TIME_WAIT.
        sockudo_port=$((sockudo_port + 1))
        bench/run-sockudo.sh "$sockudo_port" >"$workdir/server.log" 2>&1 &
        server_pids+=("$!")
        wait_http "http://127.0.0.1:$sockudo_port/up/bench" || return 1
        bench_args=(--server pusher --connect "127.0.0.1:$sockudo_port"
            --http "127.0.0.1:$sockudo_port" --pid "${server_pids[0]}")
        ;;
    distributed-tcp)
        if [[ -z "${NATS_SERVER_BIN:-}" ]]; then
            return 1
        fi
        local nats_port=4333
        rm -rf "$workdir/nats"
        "$NATS_SERVER_BIN" -js -a 127.0.0.1 -p "$nats_port" -sd "$workdir/nats" >"$workdir/nats.log" 2>&1 &
        server_pids+=("$!")
        cat >"$workdir/fleet.yaml" <<EOF
nats: { url: "nats://127.0.0.1:$nats_port" }
comet: { id: comet-0 }
logic: { auth: { mode: none }, api: { allow_unauthenticated: true } }
discovery:
  kind: static
  logics: ["127.0.0.1:3119"]
  comets: [{ id: comet-0, addr: "127.0.0.1:3109" }]
EOF
        for _ in $(seq 100); do
            (echo >"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
            sleep 0.05
        done
        for role in logic comet job; do
            "$bin/pushcluster" "$role" --config "$workdir/fleet.yaml" --log-level warn \
                >"$workdir/$role.log" 2>&1 &
            server_pids+=("$!")
        done
        wait_http http://127.0.0.1:3191/readyz || return 1
        wait_http http://127.0.0.1:3190/readyz || return 1
        wait_http http://127.0.0.1:3192/readyz || return 1
        # --pid: the comet, which holds the connections.
        bench_args=(--transport tcp --pid "${server_pids[2]}")
        ;;
    *)
        echo "unknown target $1" >&2
        return 1
        ;;
    esac
}

scenario_args() {
    case "$1" in
    idle) echo "idle --connections $max --rooms 10 --hold 5" ;;
    lone) echo "lone --connections 1 --count 300 --interval-ms 20" ;;
    room-40) echo "room --connections $max --rooms 1 --rate 40 --duration 10" ;;
    room-closed-1k) echo "room --connections 1000 --rooms 1 --rate 0 --concurrency 8 --duration 10" ;;
    room-closed-10k) echo "room --connections 10000 --rooms 1 --rate 0 --concurrency 8 --duration 10" ;;
    room-closed-max) echo "room --connections $max --rooms 1 --rate 0 --concurrency 8 --duration 10" ;;
    churn) echo "churn --connections 1000 --rate 500 --hold-ms 1000 --duration 10" ;;
    *) return 1 ;;
    esac
}

for run in $(seq "$runs"); do
    for target in $targets; do
        for scenario in $scenarios; do
            args="$(scenario_args "$scenario")"
            # Distributed: the message path, not connection handling (the
            # comet is the same), and no closed loop at the largest size:
            # logic outruns one comet there and the stream's backlog, not
            # the fleet, is measured (docs/benchmarks.md).
            if [[ "$target" == distributed-* && ("$scenario" != lone && "$scenario" != room-*
                || "$scenario" == room-closed-max) ]]; then
                continue
            fi
            if [[ "$target" == distributed-* && -z "${NATS_SERVER_BIN:-}" ]]; then
                echo "skipping $target: set NATS_SERVER_BIN for the distributed fleet" >&2
                continue 2
            fi
            if ! start_target "$target"; then
                echo "  $target did not start; $scenario skipped" >&2
                tail -5 "$workdir"/*.log >&2 || true
                stop_servers
                continue
            fi
            result="$out/$target.$scenario.$run.json"
            echo "run $run: $target $scenario" >&2
            # shellcheck disable=SC2086
            if ! "$bin/pushcluster-bench" $args "${bench_args[@]}" --quiet --json >"$result" 2>"$result.log"; then
                echo "  failed, see $result.log" >&2
            fi
            stop_servers
        done
    done
done
echo "results in $out; medians: python3 bench/summarize.py $out" >&2
