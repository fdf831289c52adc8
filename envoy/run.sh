#!/usr/bin/env bash
# `make run`: Envoy with keygate on 127.0.0.1:10000 in front of the sample coordinator.
#
# The key store lives in .run/keygate.json (kept between runs, so keys you create stay);
# Envoy reads the filter's configuration from .run/ecds/keygate.yaml (ECDS) and reloads it
# when `keygate ... --apply` replaces that file; the store names Envoy's admin, so --apply
# returns once Envoy serves the change (or undoes it if Envoy rejects it). Each start
# issues a fresh demo key and revokes the previous run's one; only hashes are stored.
# Envoy's access log (a line per request, with the decision and the key id) goes to
# $RUN/access.log.
#
# Settings for running several stacks side by side (the integration tests do):
#   KEYGATE_RUN_DIR (.run), KEYGATE_PORT (10000), KEYGATE_ADMIN_PORT (9901),
#   KEYGATE_UPSTREAM_PORT (8081), KEYGATE_POLICY (envoy/policy.json).
#
# The policy (routes, plans, IP rules) lives in the store once it exists. Each start
# compares it with envoy/policy.json: if the file was edited since it was last adopted,
# the file is applied to the store (the lines that change are printed, and the store's
# previous policy is kept in $RUN/policy.before-<time>.json); if only the store changed
# (`keygate policy set`), the store's policy is kept and the difference is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=.venv/bin/envoy
KEYGATE=target/release/keygate
ECHO=target/release/keygate-echo
RUN=${KEYGATE_RUN_DIR:-.run}
POLICY=${KEYGATE_POLICY:-envoy/policy.json}
PORT=${KEYGATE_PORT:-10000} ADMIN_PORT=${KEYGATE_ADMIN_PORT:-9901} UPSTREAM_PORT=${KEYGATE_UPSTREAM_PORT:-8081}
LISTEN=127.0.0.1:$PORT ADMIN=127.0.0.1:$ADMIN_PORT UPSTREAM=127.0.0.1:$UPSTREAM_PORT
export KEYGATE_STORE=$RUN/keygate.json

for addr in $LISTEN $ADMIN $UPSTREAM; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    echo "make run: $addr is already in use (another 'make run'?); stop that first." >&2
    exit 1
  fi
done

mkdir -p "$RUN"
if [ ! -f "$KEYGATE_STORE" ]; then
  # The ECDS path is relative to the store's directory; the .wasm path to Envoy's.
  "$KEYGATE" init --ecds ecds/keygate.yaml --wasm target/wasm32-wasip1/release/keygate.wasm \
    --policy "$POLICY" >/dev/null
  cp "$POLICY" "$RUN/policy.adopted.json"
else
  "$KEYGATE" policy show > "$RUN/policy.store.json"
  set +e
  changes=$(python3 envoy/policy_drift.py "$POLICY" "$RUN/policy.store.json" "$RUN/policy.adopted.json")
  drift=$?
  set -e
  case $drift in
    0) cp "$POLICY" "$RUN/policy.adopted.json" ;;
    1)
      kept="$RUN/policy.before-$(date -u +%Y%m%dT%H%M%SZ).json"
      cp "$RUN/policy.store.json" "$kept"
      echo "make run: $POLICY changed since the store took it; applying it (the store's previous policy is in $kept):"
      echo "$changes"
      if ! "$KEYGATE" policy set "$POLICY" >/dev/null; then
        echo "make run: $POLICY was not applied (the reason is above); fix it, or restore it, and start again." >&2
        exit 1
      fi
      cp "$POLICY" "$RUN/policy.adopted.json"
      ;;
    2)
      echo "make run: the store's policy differs from $POLICY (it was changed with 'keygate policy set'); keeping the store's. What $POLICY would change:"
      echo "$changes"
      echo "  (to use the file's: KEYGATE_STORE=$KEYGATE_STORE $KEYGATE policy set $POLICY)"
      ;;
    *) echo "make run: $changes" >&2; exit 1 ;;
  esac
fi
# The store names this Envoy's admin (the port may differ from the last run's), so that
# `keygate ... --apply` confirms each change with it. The apply just below runs before
# Envoy starts (Envoy needs the ECDS file to start): the admin does not answer yet, and
# the change is only written, which is what is wanted here.
"$KEYGATE" set-admin "http://$ADMIN" >/dev/null
if [ -f "$RUN/demo-key-id" ]; then
  "$KEYGATE" revoke "$(cat "$RUN/demo-key-id")" >/dev/null 2>&1 || true
fi
created=$("$KEYGATE" --json create --name demo --role client --client demo --tenant demo-tenant \
  --scope jobs:write --plan free --expires-in 30d --apply)
read -r key_id key < <(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["id"], d["key"])' <<<"$created")
echo "$key_id" > "$RUN/demo-key-id"

# This Envoy's copy of envoy/envoy.yaml: its ports, and the ECDS directory under $RUN.
sed -e "s#envoy/ecds#$RUN/ecds#g" \
    -e "s/port_value: 10000/port_value: $PORT/" \
    -e "s/port_value: 9901/port_value: $ADMIN_PORT/" \
    -e "s/port_value: 8081/port_value: $UPSTREAM_PORT/" \
    -e "s#path: /dev/stdout#path: $RUN/access.log#" \
    envoy/envoy.yaml > "$RUN/envoy.yaml"

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "make run: stopped."
}
trap cleanup EXIT
# Ctrl-C is how `make run` is meant to end: a clean exit, not an error.
trap 'exit 0' INT TERM

"$ECHO" --listen "$UPSTREAM" >/dev/null &
pids+=($!)
# Envoy's own chatter at warning; keygate's lines (one per denial) at info. No hot
# restart: this Envoy shares no shared memory with another one started on the machine.
# Access log lines are written out every second (Envoy's default: every 10 seconds).
"$ENVOY" -c "$RUN/envoy.yaml" --concurrency 2 --disable-hot-restart -l warning --file-flush-interval-msec 1000 \
  --component-log-level wasm:info --log-format '[%Y-%m-%d %T.%e][%l] %v' &
pids+=($!)

for _ in $(seq 1 150); do
  if curl -fs "http://$ADMIN/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "${pids[1]}" 2>/dev/null; then echo "make run: Envoy exited; see the lines above." >&2; exit 1; fi
  sleep 0.2
done
curl -fs "http://$ADMIN/ready" >/dev/null || { echo "make run: Envoy did not become ready" >&2; exit 1; }

cat <<TXT

keygate is running: Envoy on http://$LISTEN (admin http://$ADMIN), coordinator on $UPSTREAM.

Demo key $key_id (client "demo", tenant demo-tenant, role client, scope jobs:write, plan free):
  $key

200, the coordinator echoes what it received (identity headers, no key):
  curl -s -X POST -H 'X-Api-Key: $key' http://$LISTEN/v1/jobs
401, no key:
  curl -si http://$LISTEN/v1/jobs
403, the client role may not use the admin routes:
  curl -si -H 'Authorization: Bearer $key' http://$LISTEN/v1/admin/users
Counters (by outcome, reason and route):
  curl -s http://$ADMIN/stats/prometheus | grep '^keygate_'
Access log (a line per request: decision, key id, client; never the key):
  tail -f $RUN/access.log
Manage keys while it runs (--apply returns once Envoy serves the change, within about a second):
  export KEYGATE_STORE=$KEYGATE_STORE
  $KEYGATE list
  $KEYGATE create --name me --role admin --apply
  $KEYGATE revoke $key_id --apply

Ctrl-C stops Envoy and the coordinator.
TXT
wait -n "${pids[@]}"
