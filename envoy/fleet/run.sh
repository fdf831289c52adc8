#!/usr/bin/env bash
# `make fleet-run`: a keygate fleet on one machine. Redis (Debian's redis-server) on a
# loopback port, the rate-limit service keygate-ratelimit counting in it, and two Envoys
# (--concurrency 2) on 127.0.0.1:10000 and 127.0.0.1:10001 in front of the sample
# coordinator. Both Envoys watch one ECDS directory, written from one key store
# (.run/fleet/keygate.json), so they serve the same keys; the service reads its plans from
# that store and follows its changes. Ctrl-C stops everything this started.
#
# Settings: KEYGATE_FLEET_DIR (.run/fleet), KEYGATE_PORT_A (10000), KEYGATE_PORT_B (10001),
# KEYGATE_ADMIN_A (9901), KEYGATE_ADMIN_B (9902), KEYGATE_UPSTREAM_PORT (8081),
# KEYGATE_RLS_PORT (8089), KEYGATE_REDIS_PORT (6390).
set -euo pipefail
cd "$(dirname "$0")/../.."

ENVOY=.venv/bin/envoy
KEYGATE=target/release/keygate
RLS=target/release/keygate-ratelimit
ECHO=target/release/keygate-echo
RUN=${KEYGATE_FLEET_DIR:-.run/fleet}
PORT_A=${KEYGATE_PORT_A:-10000} PORT_B=${KEYGATE_PORT_B:-10001}
ADMIN_A=${KEYGATE_ADMIN_A:-9901} ADMIN_B=${KEYGATE_ADMIN_B:-9902}
UPSTREAM_PORT=${KEYGATE_UPSTREAM_PORT:-8081} RLS_PORT=${KEYGATE_RLS_PORT:-8089}
REDIS_PORT=${KEYGATE_REDIS_PORT:-6390}
export KEYGATE_STORE=$RUN/keygate.json

command -v redis-server >/dev/null || { echo "make fleet-run: redis-server is not installed (make setup installs it)" >&2; exit 1; }
for port in $PORT_A $PORT_B $ADMIN_A $ADMIN_B $UPSTREAM_PORT $RLS_PORT $REDIS_PORT; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "make fleet-run: 127.0.0.1:$port is already in use (another make run or fleet-run?); stop that first." >&2
    exit 1
  fi
done

mkdir -p "$RUN"
if [ ! -f "$KEYGATE_STORE" ]; then
  "$KEYGATE" init --ecds ecds/keygate.yaml --wasm target/wasm32-wasip1/release/keygate.wasm \
    --policy envoy/fleet/policy.json >/dev/null
fi
# Both Envoys' admins: --apply returns once both serve a change. The apply just below runs
# before they start (they need the ECDS file to start), so it is only written.
"$KEYGATE" set-admin "http://127.0.0.1:$ADMIN_A" "http://127.0.0.1:$ADMIN_B" >/dev/null
if [ -f "$RUN/demo-key-id" ]; then
  "$KEYGATE" revoke "$(cat "$RUN/demo-key-id")" >/dev/null 2>&1 || true
fi
created=$("$KEYGATE" --json create --name fleet-demo --role client --client demo --tenant demo-tenant \
  --scope jobs:write --plan demo5 --expires-in 30d --apply)
read -r key_id key < <(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["id"], d["key"])' <<<"$created")
echo "$key_id" > "$RUN/demo-key-id"

# Each Envoy's copy of envoy/fleet/envoy.yaml: its ports and node id, the ECDS directory
# under $RUN, the service's and the coordinator's ports.
instance() { # NAME PORT ADMIN
  sed -e "s#envoy/fleet/ecds#$RUN/ecds#g" \
      -e "s/id: keygate-edge-a/id: keygate-edge-$1/" \
      -e "s#path: /dev/stdout#path: $RUN/access-$1.log#" \
      -e "s/port_value: 10000/port_value: $2/" \
      -e "s/port_value: 9901/port_value: $3/" \
      -e "s/port_value: 8081/port_value: $UPSTREAM_PORT/" \
      -e "s/port_value: 8089/port_value: $RLS_PORT/" \
      envoy/fleet/envoy.yaml > "$RUN/envoy-$1.yaml"
}
instance a "$PORT_A" "$ADMIN_A"
instance b "$PORT_B" "$ADMIN_B"

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "make fleet-run: stopped."
}
trap cleanup EXIT
trap 'exit 0' INT TERM

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN" \
  --loglevel warning >"$RUN/redis.log" 2>&1 &
pids+=($!)
"$ECHO" --listen "127.0.0.1:$UPSTREAM_PORT" >/dev/null &
pids+=($!)
"$RLS" --store "$KEYGATE_STORE" --redis "redis://127.0.0.1:$REDIS_PORT" --listen "127.0.0.1:$RLS_PORT" \
  >"$RUN/ratelimit.log" 2>&1 &
pids+=($!)
for name in a b; do
  "$ENVOY" -c "$RUN/envoy-$name.yaml" --concurrency 2 --disable-hot-restart -l warning --file-flush-interval-msec 1000 \
    --component-log-level wasm:info --log-format "[%Y-%m-%d %T.%e][$name][%l] %v" &
  pids+=($!)
done

for admin in $ADMIN_A $ADMIN_B; do
  for _ in $(seq 1 150); do
    if curl -fs "http://127.0.0.1:$admin/ready" >/dev/null 2>&1; then break; fi
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { echo "make fleet-run: a process exited; see the lines above and $RUN/*.log" >&2; exit 1; }
    done
    sleep 0.2
  done
  curl -fs "http://127.0.0.1:$admin/ready" >/dev/null || { echo "make fleet-run: Envoy (admin $admin) did not become ready" >&2; exit 1; }
done

cat <<TXT

keygate fleet is running: Envoys on http://127.0.0.1:$PORT_A and http://127.0.0.1:$PORT_B
(admins $ADMIN_A, $ADMIN_B), keygate-ratelimit on 127.0.0.1:$RLS_PORT, Redis on 127.0.0.1:$REDIS_PORT,
coordinator on 127.0.0.1:$UPSTREAM_PORT. Logs of the service and Redis: $RUN/ratelimit.log, $RUN/redis.log;
access logs of the Envoys (a line per request: decision, key id, client): $RUN/access-a.log, $RUN/access-b.log.

Demo key $key_id on plan demo5 (5 requests a minute, for the whole fleet):
  $key

One quota across both Envoys: 8 requests, alternating between the two ports; 5 get 200,
then 429 (with Retry-After), whichever Envoy they hit:
  for i in 1 2 3 4 5 6 7 8; do curl -s -o /dev/null -w '%{http_code} ' -H 'X-Api-Key: $key' http://127.0.0.1:\$(( i % 2 ? $PORT_A : $PORT_B ))/v1/jobs; done; echo
The quota as the rate-limit service reports it:
  curl -si -H 'X-Api-Key: $key' http://127.0.0.1:$PORT_B/v1/jobs | grep -i -E '^(HTTP|x-ratelimit|retry-after)'
Shared refusals on each Envoy:
  curl -s http://127.0.0.1:$ADMIN_A/stats | grep ratelimit.over_limit
Manage keys for both (--apply returns once both Envoys serve the change):
  export KEYGATE_STORE=$KEYGATE_STORE
  $KEYGATE create --name me --role admin --plan demo5 --apply
  $KEYGATE status

Ctrl-C stops Redis, the service, both Envoys and the coordinator.
TXT
wait -n "${pids[@]}"
