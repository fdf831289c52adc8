#!/usr/bin/env bash
# `make run`: Envoy with keygate on 127.0.0.1:10000 in front of the sample coordinator.
# A fresh demo key is made on every start; only its hash goes into the configuration.
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY=.venv/bin/envoy
KEYGATE=target/release/keygate
ECHO=target/release/keygate-echo
PLACEHOLDER=sha256:0f276ec700df7954d9acc7556c190041248adad5c917636cd407dec90830fbea
LISTEN=127.0.0.1:10000 ADMIN=127.0.0.1:9901 UPSTREAM=127.0.0.1:8081

for addr in $LISTEN $ADMIN $UPSTREAM; do
  if (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null; then
    echo "make run: $addr is already in use (another 'make run'?); stop that first." >&2
    exit 1
  fi
done

mkdir -p .run
key="kg_demo_$(head -c 24 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
hash=$(printf %s "$key" | "$KEYGATE" hash)
sed "s/$PLACEHOLDER/$hash/" envoy/envoy.yaml > .run/envoy.yaml

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
# Envoy's own chatter at warning; keygate's lines (one per denial) at info.
"$ENVOY" -c .run/envoy.yaml --concurrency 2 -l warning --component-log-level wasm:info \
  --log-format '[%Y-%m-%d %T.%e][%l] %v' &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fs "http://$ADMIN/ready" >/dev/null 2>&1; then break; fi
  if ! kill -0 "${pids[1]}" 2>/dev/null; then echo "make run: Envoy exited; see the lines above." >&2; exit 1; fi
  sleep 0.2
done
curl -fs "http://$ADMIN/ready" >/dev/null || { echo "make run: Envoy did not become ready" >&2; exit 1; }

cat <<TXT

keygate is running: Envoy on http://$LISTEN (admin http://$ADMIN), coordinator on $UPSTREAM.

Demo key (client "demo", tenant demo-tenant, role client, scopes jobs:read jobs:write):
  $key

200, the coordinator echoes what it received (identity headers, no key):
  curl -s -X POST -H 'X-Api-Key: $key' http://$LISTEN/v1/jobs
401, no key:
  curl -si http://$LISTEN/v1/jobs
403, the client role may not use the admin routes:
  curl -si -H 'Authorization: Bearer $key' http://$LISTEN/v1/admin/users
Counters:
  curl -s http://$ADMIN/stats/prometheus | grep '^keygate_'

Ctrl-C stops Envoy and the coordinator.
TXT
wait -n "${pids[@]}"
