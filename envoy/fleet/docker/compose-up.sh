#!/usr/bin/env bash
# `make fleet-compose-up`: the fleet's compose stack (envoy/fleet/docker-compose.yaml) on
# this machine, after `make build`. Builds the local images offline (build-images.sh
# --fleet; an ENVOY_IMAGE, COORDINATOR_IMAGE, RATELIMIT_IMAGE or REDIS_IMAGE set in the
# environment is used instead of the local one), makes the key store
# .run/fleet-compose/keygate.json with a first key when there is none (the key is printed
# once), names both Envoys' admins in it (so --apply returns once both serve a change),
# starts the stack and waits until both Envoys are healthy.
#
# `make fleet-compose-down` (cd envoy/fleet && docker-compose down --remove-orphans) stops
# it; the store and its keys stay.
#
# Settings: those of the compose file (KEYGATE_PORT_A, KEYGATE_PORT_B, KEYGATE_ADMIN_A,
# KEYGATE_ADMIN_B, KEYGATE_BIND, KEYGATE_STORE_DIR, KEYGATE_ECDS_DIR, KEYGATE_WASM, the
# images); KEYGATE_STORE_DIR and KEYGATE_ECDS_DIR relative to the repository root here.
set -euo pipefail
umask 022
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$ROOT"

say() { echo "fleet-compose-up: $*"; }
die() { echo "fleet-compose-up: $*" >&2; exit 1; }

CLI=target/release/keygate
for f in "$CLI" target/release/keygate-ratelimit target/release/keygate-echo \
    target/wasm32-wasip1/release/keygate.wasm; do
  [ -e "$f" ] || die "no $f: run 'make build' first"
done

# Images: the local ones, unless set in the environment.
declare -A wanted
for var in ENVOY_IMAGE COORDINATOR_IMAGE RATELIMIT_IMAGE REDIS_IMAGE; do wanted[$var]=${!var:-}; done
images=$(envoy/docker/build-images.sh --fleet) || die "building the images failed"
eval "$images"
for var in ENVOY_IMAGE COORDINATOR_IMAGE RATELIMIT_IMAGE REDIS_IMAGE; do
  [ -z "${wanted[$var]}" ] || printf -v "$var" '%s' "${wanted[$var]}"
  export "${var?}"
done

STORE_DIR=$(mkdir -p "${KEYGATE_STORE_DIR:-.run/fleet-compose}" && cd "${KEYGATE_STORE_DIR:-.run/fleet-compose}" && pwd)
ECDS_DIR=${KEYGATE_ECDS_DIR:-$STORE_DIR/ecds}
mkdir -p "$ECDS_DIR"
ECDS_DIR=$(cd "$ECDS_DIR" && pwd)
STORE=$STORE_DIR/keygate.json
ADMIN_A=http://127.0.0.1:${KEYGATE_ADMIN_A:-9901}
ADMIN_B=http://127.0.0.1:${KEYGATE_ADMIN_B:-9902}
kg() { "$CLI" --store "$STORE" "$@"; }
if [ ! -f "$STORE" ]; then
  kg init --ecds "$ECDS_DIR/keygate.yaml" --wasm /etc/keygate/keygate.wasm \
    --policy envoy/fleet/docker/policy.json >/dev/null
  kg set-admin "$ADMIN_A" "$ADMIN_B" >/dev/null
  say "first key (shown once; the store is $STORE):"
  kg create --name first --role client --scope jobs:read --scope jobs:write --apply
fi
[ -f "$ECDS_DIR/keygate.yaml" ] || kg apply >/dev/null
# Envoy (uid 101) reads the ECDS directory; the service runs as the store's owner.
chmod 755 "$ECDS_DIR"
export KEYGATE_STORE_DIR=$STORE_DIR KEYGATE_ECDS_DIR=$ECDS_DIR
KEYGATE_STORE_USER=$(stat -c %u:%g "$STORE")
export KEYGATE_STORE_USER
if [ -n "${KEYGATE_WASM:-}" ]; then KEYGATE_WASM=$(realpath "$KEYGATE_WASM"); export KEYGATE_WASM; fi

cd envoy/fleet
docker-compose up -d
for _ in $(seq 1 60); do
  a=$(docker inspect -f '{{.State.Health.Status}}' "$(docker-compose ps -q envoy-a)" 2>/dev/null || true)
  b=$(docker inspect -f '{{.State.Health.Status}}' "$(docker-compose ps -q envoy-b)" 2>/dev/null || true)
  [ "$a" = healthy ] && [ "$b" = healthy ] && break
  sleep 1
done
if [ "$a" != healthy ] || [ "$b" != healthy ]; then
  die "the Envoys are not healthy (envoy-a: $a, envoy-b: $b); see: cd envoy/fleet && docker-compose logs"
fi
say "Envoys on http://127.0.0.1:${KEYGATE_PORT_A:-10000} and http://127.0.0.1:${KEYGATE_PORT_B:-10001} (admins $ADMIN_A, $ADMIN_B)"
say "one quota per key for both; manage keys with $CLI --store $STORE ... --apply"
