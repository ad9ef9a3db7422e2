#!/usr/bin/env bash
# Builds pushcluster's images without a registry: the repository's Dockerfile
# (stage binary-prebuilt on base scratch) around a binary built on this host
# plus the C libraries it links, and a NATS image around a nats-server binary.
#
#   build-offline.sh pushcluster --binary target/release/pushcluster --tag localhost/pushcluster:dev [--save out.tar]
#   build-offline.sh nats --binary "$(command -v nats-server)" --tag localhost/nats:dev [--save out.tar]
#
# PODMAN names the builder (default: podman; the Kubernetes suite uses
# "shared/k8s/cluster podman DIR"); docker works the same way.
# --save writes a docker-archive for `cluster load-image` / `ctr import`.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 1 ] || usage
image=$1; shift
binary="" tag="" save=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --save) save=$2; shift 2 ;;
    *) usage ;;
  esac
done
[ -n "$binary" ] && [ -n "$tag" ] || usage
[ -x "$binary" ] || { echo "build-offline.sh: $binary is not an executable" >&2; exit 2; }
read -r -a podman <<< "${PODMAN:-podman}"
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

context=$(mktemp -d "${TMPDIR:-/tmp}/pushcluster-image.XXXXXX")
trap 'rm -rf "$context"' EXIT

case "$image" in
  pushcluster)
    rootfs=$context/rootfs
    mkdir -p "$rootfs/usr/local/bin"
    # Debug sections are for profiling on the host; the image carries none.
    objcopy --strip-debug "$binary" "$rootfs/usr/local/bin/pushcluster"
    # The dynamic loader and every library ldd resolves, at the same paths.
    ldd "$binary" | while read -r first second third _; do
      case "$second" in
        "=>") lib=$third ;;
        *) lib=$first ;;
      esac
      case "$lib" in
        /*) mkdir -p "$rootfs$(dirname "$lib")"; cp -L "$lib" "$rootfs$lib" ;;
      esac
    done
    [ -n "$(find "$rootfs" -name 'ld-linux*')" ] \
      || { echo "build-offline.sh: ldd listed no dynamic loader for $binary" >&2; exit 1; }
    cp "$repo/Dockerfile" "$context/Dockerfile"
    "${podman[@]}" build --quiet --build-arg BINARY=prebuilt --build-arg BASE=scratch \
      -t "$tag" -f "$context/Dockerfile" "$context" >/dev/null
    ;;
  nats)
    cp -L "$binary" "$context/nats-server"
    cp "$here/nats.Dockerfile" "$context/Dockerfile"
    "${podman[@]}" build --quiet -t "$tag" -f "$context/Dockerfile" "$context" >/dev/null
    ;;
  *) usage ;;
esac
if [ -n "$save" ]; then
  rm -f "$save"
  "${podman[@]}" save --quiet --format docker-archive -o "$save" "$tag" >/dev/null
fi
echo "$tag"
