"""keygate's labelled series at /stats/prometheus (Envoy's tag extraction over the names
the filter defines), the per-key series, the denial log line and the access log, against
a real Envoy with --concurrency 2."""

from __future__ import annotations

import re
import time
from collections import Counter

import pytest

import harness
from harness import RawH2, Transfer, key_hash

# ----------------------------------------------------------------------------- keys

CLIENT = "kg_obs_client_0123456789abcdef"  # client-1: role client, tenant t1
ADMIN = "kg_obs_admin_0123456789abcdef"  # ops.admin@example:1 (dots, @ and : in the id)
LIMITED = "kg_obs_limited_0123456789abcd"  # limited-1: one request a day
SUSPENDED = "kg_obs_suspended_0123456789ab"
REVOKED = "kg_obs_revoked_0123456789abcd"
EXPIRED = "kg_obs_expired_0123456789abcd"
OFFICE = "kg_obs_office_0123456789abcde"  # office-1: only from 10.0.0.0/8
UNKNOWN = "kg_obs_unknown_0123456789abcd"  # not configured
PLAINTEXTS = [CLIENT, ADMIN, LIMITED, SUSPENDED, REVOKED, EXPIRED, OFFICE, UNKNOWN]
ADMIN_ID = "ops.admin@example:1"

KEYS = [
    {"id": "client-1", "hash": key_hash(CLIENT), "client": "acme corp", "tenant": "t1",
     "role": "client", "scopes": ["jobs:read"]},
    {"id": ADMIN_ID, "hash": key_hash(ADMIN), "role": "admin", "scopes": ["jobs:read"]},
    {"id": "limited-1", "hash": key_hash(LIMITED), "role": "client", "plan": "one"},
    {"id": "suspended-1", "hash": key_hash(SUSPENDED), "role": "client", "status": "suspended"},
    {"id": "revoked-1", "hash": key_hash(REVOKED), "role": "client", "status": "revoked"},
    {"id": "expired-1", "hash": key_hash(EXPIRED), "role": "client",
     "expires_at": "2020-01-01T00:00:00Z"},
    {"id": "office-1", "hash": key_hash(OFFICE), "role": "client", "allowed_ips": ["10.0.0.0/8"]},
]

# Two counted routes (one named, one by its prefix), a public one, and paths no rule covers.
CONFIG = {
    "keys": KEYS,
    "plans": {"one": {"requests": 1, "per": "day", "burst": 1}},
    "routes": [
        {"prefix": "/v1/jobs", "name": "jobs", "roles": ["client", "admin"], "scopes": ["jobs:read"]},
        {"prefix": "/v1/admin", "roles": ["admin"]},
        {"prefix": "/public/v1.0", "public": True},
    ],
    # 127.0.0.99 is refused by address; 127.0.0.50 is a proxy whose X-Forwarded-For counts.
    "ip_rules": {"deny": ["127.0.0.99/32"]},
    "trusted_proxies": ["127.0.0.50/32"],
    # Every 401 counts against its address: each one below comes from its own address.
    "failed_auth_limit": {"requests": 3, "per": "minute"},
    "health_path": "/keygate/health",
}

REQUESTS = "keygate_requests_total"
KEY_REQUESTS = "keygate_key_requests_total"
LAST_USED = "keygate_key_last_used_seconds"
DROPPED = "keygate_key_metrics_dropped_total"

_SAMPLE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series(envoy) -> dict[tuple[str, frozenset], float]:
    """Every keygate sample at /stats/prometheus, by (name, labels), after the counters'
    250 ms flush."""
    time.sleep(envoy.COUNTER_LAG_S)
    page = envoy.prometheus()
    out = {}
    for line in page.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparsable line {line!r} in:\n{page}"
        labels = frozenset(
            (k, re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), v))
            for k, v in _LABEL.findall(m.group(2) or "")
        )
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def of(samples: dict, name: str) -> dict[tuple, float]:
    """The samples of one metric, keyed by their labels as sorted (name, value) tuples."""
    return {tuple(sorted(labels)): v for (n, labels), v in samples.items() if n == name}


def requests_key(outcome: str, reason: str, status_class: str, route: str) -> tuple:
    return tuple(sorted({"outcome": outcome, "reason": reason, "status_class": status_class,
                         "route": route}.items()))


def delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)
            if after.get(k, 0) != before.get(k, 0)}


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(CONFIG, concurrency=2)


def key(k: str) -> list[tuple[str, str]]:
    return [("x-api-key", k)]


# Each 401 from its own address, so that the failed-authentication limit never trips.
_addresses = iter(f"127.0.1.{i}" for i in range(1, 250))


def test_labelled_series_move_by_exactly_the_scripted_mix(envoy):
    before = series(envoy)
    expected: Counter = Counter()

    def go(method, path, headers, want, reason, route, *, source=None, http2=False):
        r = envoy.request(method, path, headers, source=source, http2=http2)
        assert r.status == want, f"{method} {path} {headers}: {r}"
        if want == 200:
            expected[requests_key("allowed", "none", "2xx", route)] += 1
        else:
            assert r.json()["error"] == reason, r
            expected[requests_key("denied", reason, f"{want // 100}xx", route)] += 1
        return r

    # Allowed, on both routes, a public one, and a path no rule covers; both protocols.
    for i in range(5):
        go("GET", f"/v1/jobs/{i}?page=2", key(CLIENT), 200, None, "jobs", http2=i % 2 == 1)
    for i in range(3):
        go("GET", "/v1/admin/users", key(ADMIN), 200, None, "/v1/admin", http2=i % 2 == 0)
    go("GET", "/public/v1.0/docs", [], 200, None, "/public/v1.0")
    go("GET", "/elsewhere", key(CLIENT), 200, None, "none")
    # Every denial reason at least once.
    go("GET", "/v1/jobs", [], 401, "missing_api_key", "jobs", source=next(_addresses))
    go("GET", "/v1/jobs", key(UNKNOWN), 401, "invalid_api_key", "jobs", source=next(_addresses))
    go("GET", "/elsewhere", key(UNKNOWN), 401, "invalid_api_key", "none", source=next(_addresses))
    go("GET", "/v1/jobs", key(REVOKED), 401, "key_revoked", "jobs", source=next(_addresses))
    go("GET", "/v1/admin", key(EXPIRED), 401, "key_expired", "/v1/admin", source=next(_addresses))
    go("GET", "/v1/jobs", key(SUSPENDED), 403, "key_suspended", "jobs")
    go("GET", "/v1/admin/users", key(CLIENT), 403, "insufficient_permissions", "/v1/admin")
    go("GET", "/v1/jobs", key(CLIENT) + [("x-tenant-id", "t2")], 403, "tenant_mismatch", "jobs")
    go("GET", "/v1/jobs", key(CLIENT), 403, "ip_not_allowed", "jobs", source="127.0.0.99")
    go("GET", "/elsewhere", key(OFFICE), 403, "ip_not_allowed", "none")
    go("GET", "/v1/jobs", key(CLIENT) + [("x-forwarded-for", "not-an-address")], 403,
       "client_address_unknown", "jobs", source="127.0.0.50")
    go("GET", "/elsewhere", key(LIMITED), 200, None, "none")
    go("GET", "/elsewhere", key(LIMITED), 429, "rate_limited", "none")
    locked = next(_addresses)
    for _ in range(3):
        go("GET", "/v1/admin", key(UNKNOWN), 401, "invalid_api_key", "/v1/admin", source=locked)
    go("GET", "/v1/admin", key(ADMIN), 429, "too_many_failed_attempts", "/v1/admin", source=locked)
    # A path keygate cannot read (h2c passes a raw byte to filters): refused before any
    # rule is chosen.
    conn = RawH2(envoy.port)
    try:
        r = conn.request(b"GET", b"/v1/admin/users?\xff", [(b"x-api-key", ADMIN.encode())])
    finally:
        conn.close()
    assert r is not None and r.status == 400 and r.json()["error"] == "invalid_request", r
    expected[requests_key("denied", "invalid_request", "4xx", "none")] += 1
    # The readiness probe is answered by keygate and not counted.
    assert envoy.request("GET", "/keygate/health").status == 200

    after = series(envoy)
    got = delta(of(before, REQUESTS), of(after, REQUESTS))
    assert got == dict(expected), (
        f"got {sorted(got.items())}\nexpected {sorted(expected.items())}\n"
        f"page:\n{envoy.prometheus()}"
    )
    reasons = {dict(k)["reason"] for k in expected}
    assert reasons >= {
        "none", "invalid_request", "missing_api_key", "invalid_api_key", "key_revoked",
        "key_expired", "key_suspended", "insufficient_permissions", "tenant_mismatch",
        "ip_not_allowed", "client_address_unknown", "rate_limited", "too_many_failed_attempts",
    }
    # Every keygate name was split into its labels: none is left flattened.
    names = {n for n, _ in after}
    assert not [n for n in names if n.startswith((REQUESTS + "_", KEY_REQUESTS, LAST_USED))], names
    # No per-key series without per_key_metrics.
    assert not of(after, KEY_REQUESTS) and not of(after, LAST_USED) and DROPPED not in names


def test_the_unlabelled_counters_still_count(envoy):
    names = ["keygate_allowed", "keygate_forbidden"]
    before = envoy.counters(names)
    assert envoy.request("GET", "/v1/jobs", key(CLIENT)).status == 200
    assert envoy.request("GET", "/v1/admin", key(CLIENT)).status == 403
    after = envoy.counters(names)
    assert {n: after[n] - before[n] for n in names} == {"keygate_allowed": 1, "keygate_forbidden": 1}


def test_denial_lines_carry_method_path_and_the_failed_requirement(envoy):
    envoy.request("DELETE", "/v1/admin/users/7?token=s3cr3t-query", key(CLIENT))
    lines = envoy.wait_for_log(
        r"keygate: denied 403 insufficient_permissions \(role\) DELETE /v1/admin/users/7 "
        r"key_id=client-1 client_ip=127\.0\.0\.1$")
    assert lines, envoy.log_tail()
    envoy.request("GET", "/v1/jobs", key(CLIENT) + [("x-tenant-id", "t9")])
    assert envoy.wait_for_log(r"denied 403 tenant_mismatch \(tenant\) GET /v1/jobs key_id=client-1"), \
        envoy.log_tail()
    envoy.request("GET", "/v1/jobs", key(CLIENT), source="127.0.0.99")
    assert envoy.wait_for_log(
        r"denied 403 ip_not_allowed \(ip_rules\) GET /v1/jobs client_ip=127\.0\.0\.99"), envoy.log_tail()
    envoy.request("GET", "/x" * 150, key(OFFICE))
    long = envoy.wait_for_log(r"denied 403 ip_not_allowed \(allowed_ips\) GET /x/x.*\.\.\. key_id=office-1")
    assert long, envoy.log_tail()
    path = re.search(r" GET (\S+) key_id=", long[0]).group(1)
    assert len(path) == 200, path
    log = envoy.log()
    assert "s3cr3t-query" not in log
    assert not [k for k in PLAINTEXTS if k in log]


def test_access_log_lines_name_the_key_of_allowed_and_refused_requests(envoy):
    marker = f"/v1/jobs/access-{time.monotonic_ns()}"
    assert envoy.request("GET", marker, key(CLIENT)).status == 200
    assert envoy.request("POST", marker, key(ADMIN) + [("x-tenant-id", "t1")]).status == 200
    assert envoy.request("GET", marker, key(SUSPENDED)).status == 403
    assert envoy.request("GET", marker, key(CLIENT) + [("x-tenant-id", "t2")]).status == 403
    assert envoy.request("GET", marker, key(REVOKED), source=next(_addresses)).status == 401
    # A client's own x-keygate-key-id on a refused request is not logged as keygate's.
    r = envoy.request("GET", marker, key(UNKNOWN) + [("x-keygate-key-id", "admin-spoof")],
                      source=next(_addresses))
    assert r.status == 401
    lines = []
    deadline = time.monotonic() + 10
    while len(lines) < 6 and time.monotonic() < deadline:
        lines = [line for line in envoy.access_log().splitlines() if marker in line]
        time.sleep(0.1)
    assert len(lines) == 6, lines
    allowed, admin, suspended, mismatch, revoked, unknown = lines
    assert " 200 via_upstream " in allowed and " key_id=client-1 " in allowed, allowed
    assert 'client="acme corp"' in allowed, allowed
    assert f" key_id={ADMIN_ID} " in admin, admin
    assert " 403 keygate_key_suspended " in suspended, suspended
    assert " key_id=suspended-1 " in suspended and 'client="-"' in suspended, suspended
    assert " 403 keygate_tenant_mismatch " in mismatch and " key_id=client-1 " in mismatch
    assert " 401 keygate_key_revoked " in revoked and " key_id=revoked-1 " in revoked, revoked
    assert " 401 keygate_invalid_api_key " in unknown, unknown
    assert " key_id=- " in unknown and "admin-spoof" not in unknown, unknown
    for line in lines:
        assert " ip=127.0." in line, line
    # "What did key X do": one grep finds its allowed and refused requests.
    assert [line for line in lines if " key_id=client-1 " in line] == [allowed, mismatch]
    # Never a key, in any line of the access log.
    log = envoy.access_log()
    assert not [k[:12] for k in PLAINTEXTS if k in log]


def test_the_access_log_format_is_the_shipped_one():
    """The harness logs with envoy/envoy.yaml's format and tag rules (src/metrics.rs holds
    them; its unit test checks every envoy/*.yaml against them)."""
    yaml = (harness.REPO_ROOT / "envoy/envoy.yaml").read_text()
    m = re.search(r'inline_string: "((?:[^"\\]|\\.)*)"', yaml)
    assert m, "no access log format in envoy/envoy.yaml"
    shipped = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), m.group(1))
    assert shipped == harness.ACCESS_LOG_FORMAT
    for tag in harness.STATS_TAGS:
        assert f"- tag_name: {tag['tag_name']}\n    regex: '{tag['regex']}'\n" in yaml


# ----------------------------------------------------------------------------- per key


def per_key_config(**extra) -> dict:
    return {**CONFIG, "failed_auth_limit": None, "per_key_metrics": True, **extra}


def _clean(config: dict) -> dict:
    return {k: v for k, v in config.items() if v is not None}


def test_per_key_series_count_each_key_by_outcome_and_reason(start_envoy):
    envoy = start_envoy(_clean(per_key_config()), concurrency=2)
    assert of(series(envoy), DROPPED) == {(): 0.0}, "the dropped counter shows at zero"
    for i in range(4):
        assert envoy.request("GET", "/v1/jobs", key(CLIENT), http2=i % 2 == 0).status == 200
    assert envoy.request("GET", "/v1/admin", key(CLIENT)).status == 403
    assert envoy.request("GET", "/v1/jobs", key(CLIENT) + [("x-tenant-id", "x")]).status == 403
    assert envoy.request("GET", "/v1/admin", key(ADMIN)).status == 200
    assert envoy.request("GET", "/v1/jobs", key(REVOKED)).status == 401
    assert envoy.request("GET", "/elsewhere", key(LIMITED)).status == 200
    assert envoy.request("GET", "/elsewhere", key(LIMITED)).status == 429
    # Unknown keys and requests without a key create no per-key series.
    assert envoy.request("GET", "/v1/jobs", key(UNKNOWN)).status == 401
    assert envoy.request("GET", "/v1/jobs").status == 401
    assert envoy.request("GET", "/public/v1.0/x").status == 200
    now = time.time()
    samples = series(envoy)
    got = {
        (dict(k)["key_id"], dict(k)["outcome"], dict(k)["reason"]): v
        for k, v in of(samples, KEY_REQUESTS).items()
    }
    assert got == {
        ("client-1", "allowed", "none"): 4,
        ("client-1", "denied", "insufficient_permissions"): 1,
        ("client-1", "denied", "tenant_mismatch"): 1,
        (ADMIN_ID, "allowed", "none"): 1,
        ("revoked-1", "denied", "key_revoked"): 1,
        ("limited-1", "allowed", "none"): 1,
        ("limited-1", "denied", "rate_limited"): 1,
    }, f"{got}\n{envoy.prometheus()}"
    last = {dict(k)["key_id"]: v for k, v in of(samples, LAST_USED).items()}
    # A revoked key never authenticated: counted, but it has no last use.
    assert set(last) == {"client-1", ADMIN_ID, "limited-1"}, last
    for key_id, t in last.items():
        assert now - 10 <= t <= now + 1, (key_id, t, now)
    assert of(samples, DROPPED) == {(): 0.0}
    page = envoy.prometheus()
    assert UNKNOWN not in page and not [k for k in PLAINTEXTS if k in page]


def test_last_used_moves_forward(start_envoy):
    envoy = start_envoy(_clean(per_key_config()), concurrency=2)
    assert envoy.request("GET", "/v1/jobs", key(CLIENT)).status == 200
    first = of(series(envoy), LAST_USED)[(("key_id", "client-1"),)]
    time.sleep(1.2)
    # A refusal after authentication is a use too.
    assert envoy.request("GET", "/v1/admin", key(CLIENT), http2=True).status == 403
    second = of(series(envoy), LAST_USED)[(("key_id", "client-1"),)]
    assert second >= first + 1, (first, second)
    assert abs(second - time.time()) < 5


def test_per_key_series_stop_at_the_cap_and_the_rest_is_counted_as_dropped(start_envoy):
    envoy = start_envoy(_clean(per_key_config(per_key_metrics_max=2)), concurrency=2)
    # One connection, so one worker: the cap is per worker (each worker defines series for
    # at most per_key_metrics_max keys).
    plan = [CLIENT, ADMIN, CLIENT, OFFICE, OFFICE, ADMIN, OFFICE]
    paths = {CLIENT: "/v1/jobs", ADMIN: "/v1/admin", OFFICE: "/elsewhere"}
    responses = envoy.request_sequence([Transfer("GET", paths[k], key(k)) for k in plan])
    assert [r.status for r in responses] == [200, 200, 200, 403, 403, 200, 403]
    samples = series(envoy)
    got = {(dict(k)["key_id"], dict(k)["reason"]): v for k, v in of(samples, KEY_REQUESTS).items()}
    assert got == {("client-1", "none"): 2, (ADMIN_ID, "none"): 2}, got
    assert set(dict(k)["key_id"] for k in of(samples, LAST_USED)) == {"client-1", ADMIN_ID}
    assert of(samples, DROPPED) == {(): 3.0}
    # The requests themselves are counted as always.
    assert sum(v for k, v in of(samples, REQUESTS).items()
               if ("reason", "ip_not_allowed") in k) == 3
