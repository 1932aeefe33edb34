#!/usr/bin/env bash
# Builds the punch-rendezvous and punchd images on a host that cannot reach
# an image registry: binaries are built here with cargo, and the runtime
# base is made from this host's own glibc (what distroless/cc provides).
#
#   deploy/build-image.sh            # -> localhost/punch-rendezvous:local
#                                    #    localhost/punchd:local
# Environment:
#   CONTAINER_TOOL  podman (default) or docker
#   PROFILE         cargo profile for the binaries (default release)
#   TAG             image tag (default local)
#
# With a registry at hand, skip this script and build the Containerfile's
# defaults instead (see deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

tool=${CONTAINER_TOOL:-podman}
profile=${PROFILE:-release}
tag=${TAG:-local}
# Debian's podman works here with runc and cgroupfs (crun fails on this
# cgroup setup), and builds need explicit rlimits.
podman_flags=()
build_flags=()
if [ "$tool" = podman ]; then
  podman_flags=(--runtime runc --cgroup-manager cgroupfs)
  build_flags=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --format docker)
fi

echo "== cargo build --profile $profile (punch-rendezvous, punchd)"
cargo build --profile "$profile" -p punch-rendezvous -p punchd
target_dir=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
[ "$profile" = dev ] && out_dir=debug || out_dir=$profile

rm -rf deploy/prebuilt && mkdir -p deploy/prebuilt
for bin in punch-rendezvous punchd; do
  cp "$target_dir/$out_dir/$bin" deploy/prebuilt/
  strip deploy/prebuilt/$bin
done

echo "== runtime base from this host's libraries"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
for bin in deploy/prebuilt/*; do
  # Each library at the path the dynamic loader will look for it.
  ldd "$bin" | awk '/=> \// {print $3} /^[[:space:]]*\/.*ld-linux/ {print $1}'
done | sort -u | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
mkdir -p "$root/etc" "$root/tmp" "$root/home/nonroot"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
base="localhost/punchd-runtime-base:$tag"
tar --numeric-owner --owner=0 --group=0 -C "$root" -c . \
  | "$tool" "${podman_flags[@]}" import - "$base" >/dev/null
echo "   $base"

for target in rendezvous punchd; do
  name=$([ $target = rendezvous ] && echo punch-rendezvous || echo punchd)
  echo "== image $name (target $target)"
  "$tool" "${podman_flags[@]}" build "${build_flags[@]}" -q \
    -f deploy/Containerfile --target "$target" \
    --build-arg RUNTIME_IMAGE="$base" --build-arg BINARIES=prebuilt \
    -t "localhost/$name:$tag" .
done
"$tool" "${podman_flags[@]}" images --filter reference="localhost/*:$tag"
