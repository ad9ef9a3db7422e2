#!/usr/bin/env bash
# The latency of a chat message in a quiet room while the same comet fans
# out a busy room (docs/benchmarks.md, "Latency under load"): BUSY clients
# in one room get RATE room pushes/s, and meanwhile one client in another
# room gets COUNT lone pushes, one at a time, INTERVAL_MS apart. Prints the
# lone run's summary, then the busy run's.
#
#   ./target/release/pushcluster standalone &
#   bench/latency-under-load.sh                         # standalone on :3101/:3111
#   COMETS=1 bench/fleet.sh --run bench/latency-under-load.sh   # distributed
#
# Env: BUSY (19000), RATE (40), COUNT (1000: a p99 is then its tenth-
# worst, not its third-worst), INTERVAL_MS (50), BIN
# (target/release), TARGET_ARGS (the server's --connect/--http/--pid
# arguments; bench/fleet.sh sets them), TRANSPORT (tcp|ws), BUSY_NICE
# (e.g. 19: the busy room's generator yields the cores to the server and
# the lone client, as 19,000 clients on other machines would; unset: it
# competes with them), LONE_NICE (e.g. -10: the lone client's process
# is scheduled first, as a client on a machine of its own would be),
# LONE_CHRT (e.g. "-f 50": the lone client runs under `chrt -f 50`, a
# real-time priority, so its own wakeups never wait for the busy room's
# generator; what is left is the server's part), BUSY_CPUS and LONE_CPUS
# (e.g. 1: `taskset -c` for the busy room's generator and the lone client,
# so that a server pinned to the other core has it to itself, as on a
# machine of its own):
#
#   taskset -c 0 ./target/release/pushcluster standalone &
#   BUSY_CPUS=1 LONE_CPUS=1 LONE_CHRT="-f 50" bench/latency-under-load.sh
#   FLEET_CPUS=0 BUSY_CPUS=1 LONE_CPUS=1 LONE_CHRT="-f 50" COMETS=1 \
#       bench/fleet.sh --run bench/latency-under-load.sh
set -euo pipefail

cd "$(dirname "$0")/.."
bin="${BIN:-target/release}"
busy="${BUSY:-19000}"
rate="${RATE:-40}"
count="${COUNT:-1000}"
interval="${INTERVAL_MS:-50}"
read -r -a target <<<"${TARGET_ARGS:---transport ${TRANSPORT:-tcp}}"
# The busy room pushes for as long as connecting takes (at the bench's 2,000
# connections/s) plus the whole lone run, with margin.
duration=$((busy / 2000 + count * (interval + 10) / 1000 + 15))

work="$(mktemp -d)"
busy_pid=""
cleanup() {
    [[ -n "$busy_pid" ]] && kill "$busy_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

busy_prefix=()
[[ -n "${BUSY_CPUS:-}" ]] && busy_prefix=(taskset -c "$BUSY_CPUS")
[[ -n "${BUSY_NICE:-}" ]] && busy_prefix+=(nice -n "$BUSY_NICE")
"${busy_prefix[@]}" "$bin/pushcluster-bench" room "${target[@]}" --namespace busy --connections "$busy" \
    --rooms 1 --rate "$rate" --duration "$duration" >"$work/busy.txt" 2>"$work/busy.log" &
busy_pid=$!
# Start the lone pushes once the busy room is connected and receiving.
for _ in $(seq 1200); do
    grep -q "received [1-9]" "$work/busy.log" 2>/dev/null && break
    if ! kill -0 "$busy_pid" 2>/dev/null; then
        echo "latency-under-load: the busy run ended early:" >&2
        cat "$work/busy.log" >&2
        exit 1
    fi
    sleep 0.1
done
echo "latency-under-load: $busy clients in a busy room at $rate pushes/s; lone pushes start" >&2
# The lone client's own run: no --pid (the busy run reports the server).
lone_target=()
skip=0
for arg in "${target[@]}"; do
    if ((skip)); then
        skip=0
        continue
    fi
    if [[ "$arg" == --pid ]]; then
        skip=1
        continue
    fi
    lone_target+=("$arg")
done
lone_prefix=()
[[ -n "${LONE_CPUS:-}" ]] && lone_prefix=(taskset -c "$LONE_CPUS")
if [[ -n "${LONE_CHRT:-}" ]]; then
    read -r -a chrt_args <<<"$LONE_CHRT"
    lone_prefix+=(chrt "${chrt_args[@]}")
fi
[[ -n "${LONE_NICE:-}" ]] && lone_prefix+=(nice -n "$LONE_NICE")
"${lone_prefix[@]}" "$bin/pushcluster-bench" lone "${lone_target[@]}" --namespace quiet --connections 1 \
    --count "$count" --interval-ms "$interval" --quiet
wait "$busy_pid"
busy_pid=""
echo "--- the busy room:"
cat "$work/busy.txt"
