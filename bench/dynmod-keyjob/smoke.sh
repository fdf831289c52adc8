#!/usr/bin/env bash
# Builds the module, starts a real Envoy (loopback only, free ports, --concurrency 2) with it
# and checks with curl: keyjob allowed (200, x-keygate-key-id set, x-api-key removed), unknown
# and missing key (401 + JSON body), fulljob allowed (x-ratelimit-* on the response) and refused
# from [::1] (403), and that Envoy refuses a bad configuration. With --h2load, one
# `h2load --h1 -c 16 -n 60000` run against a bare keyjob listener and one against a listener
# without the filter (a few seconds each; not a benchmark, bench/run.py is).
#
# Usage (from the repository root): bench/dynmod-keyjob/smoke.sh [--h2load]
# ENVOY overrides the Envoy binary (default: .venv/bin/envoy, as `make setup` installs it).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
envoy="${ENVOY:-$root/.venv/bin/envoy}"
run_h2load=0
[[ "${1:-}" == "--h2load" ]] && run_h2load=1

cargo build --release --quiet --manifest-path "$here/Cargo.toml"
so_dir="$here/target/release"
test -f "$so_dir/libdynmod_keyjob.so"

work="$(mktemp -d)"
envoy_pid=""
cleanup() {
  if [[ -n "$envoy_pid" ]]; then kill "$envoy_pid" 2>/dev/null || true; wait "$envoy_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

read -r admin_port key_port full_port full6_port bench_port base_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
')

key0="kg_dynmod_smoke_0"
key1="kg_dynmod_smoke_1"
d0="$(printf %s "$key0" | sha256sum | cut -d' ' -f1)"
d1="$(printf %s "$key1" | sha256sum | cut -d' ' -f1)"

# $1 listener name, $2 address, $3 port, $4 filter configuration string ("" for the router
# alone), $5 "bare" for no access log and only "/" (direct_response 200).
listener() {
  local name="$1" address="$2" port="$3" config="$4" bare="${5:-}"
  echo "  - name: $name"
  echo "    address: {socket_address: {address: \"$address\", port_value: $port}}"
  echo "    filter_chains:"
  echo "    - filters:"
  echo "      - name: envoy.filters.network.http_connection_manager"
  echo "        typed_config:"
  echo "          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
  echo "          stat_prefix: $name"
  if [[ -z "$bare" ]]; then
    echo "          access_log:"
    echo "          - name: envoy.access_loggers.file"
    echo "            typed_config:"
    echo "              \"@type\": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog"
    echo "              path: $work/access.log"
    echo "              log_format: {text_format_source: {inline_string: \"$name %RESPONSE_CODE% id=%REQ(X-KEYGATE-KEY-ID)% key=%REQ(X-API-KEY)%\\n\"}}"
  fi
  echo "          route_config:"
  echo "            virtual_hosts:"
  echo "            - name: all"
  echo "              domains: [\"*\"]"
  echo "              routes:"
  if [[ -z "$bare" ]]; then
    echo "              - match: {prefix: \"/seen\"}"
    echo "                direct_response: {status: 200, body: {inline_string: \"seen\"}}"
    echo "                response_headers_to_add:"
    echo "                - header: {key: x-seen-key-id, value: \"%REQ(x-keygate-key-id)%\"}"
    echo "                - header: {key: x-seen-api-key, value: \"%REQ(x-api-key)%\"}"
  fi
  echo "              - match: {prefix: \"/\"}"
  echo "                direct_response: {status: 200}"
  echo "          http_filters:"
  if [[ -n "$config" ]]; then
    echo "          - name: envoy.filters.http.dynamic_modules"
    echo "            typed_config:"
    echo "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"
    echo "              dynamic_module_config: {name: dynmod_keyjob}"
    echo "              filter_name: keyjob"
    echo "              filter_config:"
    echo "                \"@type\": type.googleapis.com/google.protobuf.StringValue"
    echo "                value: \"$config\""
  fi
  echo "          - name: envoy.filters.http.router"
  echo "            typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}"
}

bootstrap() { # $1 output file, $2 the keyjob listener's configuration string
  {
    echo "admin: {address: {socket_address: {address: 127.0.0.1, port_value: $admin_port}}}"
    echo "static_resources:"
    echo "  listeners:"
    listener keyjob 127.0.0.1 "$key_port" "$2"
    listener fulljob 127.0.0.1 "$full_port" "fulljob:$d0,$d1"
    listener fulljob6 "::1" "$full6_port" "fulljob:$d0,$d1"
    listener bench 127.0.0.1 "$bench_port" "keyjob:$d0,$d1" bare
    listener baseline 127.0.0.1 "$base_port" "" bare
  } >"$1"
}

export ENVOY_DYNAMIC_MODULES_SEARCH_PATH="$so_dir"
fail=0
check() { # $1 description, $2 expected, $3 actual
  if [[ "$2" == "$3" ]]; then echo "ok   $1"; else echo "FAIL $1: expected [$2], got [$3]"; fail=1; fi
}

# 1. A bad configuration (a digest that is not 64 hex digits) is refused at startup.
bootstrap "$work/bad.yaml" "keyjob:$d0,not-a-digest"
if timeout 30 "$envoy" -c "$work/bad.yaml" --concurrency 2 --base-id 731 -l warning \
    >"$work/bad.out" 2>&1; then
  echo "FAIL bad configuration: Envoy started"; fail=1
else
  reason="$(grep -o 'dynmod-keyjob: [^"]*' "$work/bad.out" | head -1)"
  refused="$(grep -o 'Failed to initialize dynamic module' "$work/bad.out" | head -1)"
  check "bad configuration refused" "Failed to initialize dynamic module" "$refused"
  echo "     (module logged: $reason)"
fi

# 2. The real run.
bootstrap "$work/envoy.yaml" "keyjob:$d0,$d1"
"$envoy" -c "$work/envoy.yaml" --concurrency 2 --base-id 732 -l info \
  --log-path "$work/envoy.log" &
envoy_pid=$!
for _ in $(seq 100); do
  if curl -sf "http://127.0.0.1:$admin_port/ready" >/dev/null 2>&1; then break; fi
  sleep 0.1
done

hdr() { grep -i "^$1:" "$2" | head -1 | cut -d' ' -f2- | tr -d '\r'; }

code="$(curl -s -o "$work/b" -D "$work/h" -w '%{http_code}' -H "x-api-key: $key1" "http://127.0.0.1:$key_port/seen")"
check "keyjob known key: status" 200 "$code"
check "keyjob known key: x-keygate-key-id reached the route" k0000001 "$(hdr x-seen-key-id "$work/h")"
check "keyjob known key: x-api-key removed" "" "$(hdr x-seen-api-key "$work/h")"

code="$(curl -s -o "$work/b" -D "$work/h" -w '%{http_code}' -H "x-api-key: wrong" "http://127.0.0.1:$key_port/")"
check "keyjob unknown key: status" 401 "$code"
check "keyjob unknown key: body" '{"error":"invalid_api_key","message":"Invalid API key"}' "$(cat "$work/b")"
check "keyjob unknown key: content-type" application/json "$(hdr content-type "$work/h")"

code="$(curl -s -o "$work/b" -w '%{http_code}' "http://127.0.0.1:$key_port/")"
check "keyjob no key: status" 401 "$code"

code="$(curl -s -o "$work/b" -D "$work/h" -w '%{http_code}' -H "x-api-key: $key0" "http://127.0.0.1:$full_port/seen")"
check "fulljob known key: status" 200 "$code"
check "fulljob known key: x-keygate-key-id" k0000000 "$(hdr x-seen-key-id "$work/h")"
check "fulljob known key: x-ratelimit-limit" 1000000000 "$(hdr x-ratelimit-limit "$work/h")"
echo "     x-ratelimit-remaining: $(hdr x-ratelimit-remaining "$work/h"), x-ratelimit-reset: $(hdr x-ratelimit-reset "$work/h")"

code="$(curl -s -o "$work/b" -D "$work/h" -w '%{http_code}' -H "x-api-key: wrong" "http://127.0.0.1:$full_port/")"
check "fulljob unknown key: status" 401 "$code"
check "fulljob unknown key: no x-ratelimit-limit" "" "$(hdr x-ratelimit-limit "$work/h")"

code="$(curl -s -o "$work/b" -w '%{http_code}' -H "x-api-key: $key0" "http://[::1]:$full6_port/")"
check "fulljob from [::1]: status" 403 "$code"
check "fulljob from [::1]: body" '{"error":"ip_not_allowed","message":"Access denied from this IP address"}' "$(cat "$work/b")"

if [[ "$run_h2load" == 1 ]]; then
  for target in "bench $bench_port" "baseline $base_port"; do
    set -- $target
    echo "h2load --h1 -c 16 -t 1 -n 60000, listener $1 (no access log, / direct_response 200):"
    h2load --h1 -c 16 -t 1 -n 60000 -H "x-api-key: $key0" "http://127.0.0.1:$2/" \
      | grep -E '^(finished in|requests:|status codes:)' | sed 's/^/     /'
  done
fi

kill "$envoy_pid"; wait "$envoy_pid" 2>/dev/null || true; envoy_pid=""
# Envoy's log and access log are written on timers; both are complete once it has stopped.
abi="$(grep -o 'Dynamic module ABI version [^ ]* [a-z]*' "$work/envoy.log" | head -1 || true)"
check "module loaded, ABI version matched" "Dynamic module ABI version v0.2.0 matched" "$abi"
echo "access log (the id and the key as the route saw them):"; sed 's/^/     /' "$work/access.log"
check "access log: keyjob allowed, id set, key removed" "keyjob 200 id=k0000001 key=-" "$(head -1 "$work/access.log")"
if [[ "$fail" == 0 ]]; then echo "smoke: all checks passed"; else echo "smoke: FAILED"; exit 1; fi
