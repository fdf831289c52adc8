"""Counters at the admin endpoint, and what the log says (and never says)."""

import secrets

import pytest

from catalog import (
    ADMIN, ALL_PLAINTEXTS, BARE, CLIENT, EXPIRED, MAIN_CONFIG, READER, REVOKED, SUSPENDED,
    assert_allowed, assert_denied,
)

COUNTERS = ["keygate_allowed", "keygate_unauthorized", "keygate_forbidden", "keygate_rate_limited"]


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


def test_counters_exist_at_zero_on_a_fresh_envoy(start_envoy):
    envoy = start_envoy(MAIN_CONFIG)
    assert envoy.counters(COUNTERS) == {name: 0 for name in COUNTERS}


def test_counters_count_each_outcome(envoy):
    before = envoy.counters(COUNTERS)
    allowed = [
        ("POST", "/v1/jobs", [("x-api-key", CLIENT)]),
        ("GET", "/v1/admin", [("authorization", f"Bearer {ADMIN}")]),
        ("GET", "/healthz", [("x-api-key", CLIENT)]),  # public route with a key
        ("GET", "/other", [("x-api-key", BARE)]),
        ("GET", "/other", [("x-api-key", READER)]),
    ]
    unauthorized = [
        ("GET", "/other", []),
        ("GET", "/other", [("x-api-key", "kg_counter_unknown_000000000")]),
        ("GET", "/other", [("x-api-key", REVOKED)]),
        ("GET", "/other", [("x-api-key", EXPIRED)]),
    ]
    forbidden = [
        ("GET", "/other", [("x-api-key", SUSPENDED)]),
        ("GET", "/v1/admin", [("x-api-key", CLIENT)]),
        ("GET", "/other", [("x-api-key", CLIENT), ("x-tenant-id", "other-tenant")]),
    ]
    # Each request on its own connection, alternating protocols: spread over both workers.
    rounds = 3
    for i in range(rounds):
        for j, (method, path, headers) in enumerate(allowed):
            assert_allowed(envoy.request(method, path, headers, http2=(i + j) % 2 == 1))
        for j, (method, path, headers) in enumerate(unauthorized):
            r = envoy.request(method, path, headers, http2=(i + j) % 2 == 1)
            assert r.status == 401, r
        for j, (method, path, headers) in enumerate(forbidden):
            r = envoy.request(method, path, headers, http2=(i + j) % 2 == 1)
            assert r.status == 403, r
    after = envoy.counters(COUNTERS)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    assert delta == {
        "keygate_allowed": rounds * len(allowed),
        "keygate_unauthorized": rounds * len(unauthorized),
        "keygate_forbidden": rounds * len(forbidden),
        "keygate_rate_limited": 0,
    }, f"before {before}, after {after}"


def test_counters_in_prometheus_output(envoy):
    assert_allowed(envoy.request("GET", "/other", [("x-api-key", CLIENT)]))
    page = envoy.admin_get("/stats/prometheus")
    names = {line.split("{")[0].split(" ")[0] for line in page.splitlines()
             if line and not line.startswith("#")}
    for counter in COUNTERS:
        assert any(n.endswith(counter) for n in names), f"{counter} not in /stats/prometheus:\n{page}"


def test_unknown_key_is_logged_by_prefix_only(envoy, http2):
    unknown = "zq" + secrets.token_hex(16)  # unique per run: its 9-character prefix is too
    r = envoy.request("GET", "/other", [("x-api-key", unknown)], http2=http2)
    assert_denied(r, "invalid_api_key")
    lines = envoy.wait_for_log(r"invalid_api_key.*" + unknown[:4])
    assert lines, f"no log line for the denial; log tail:\n{envoy.log_tail()}"
    log = envoy.log()
    assert unknown not in log, "the full key was logged"
    assert unknown[:9] not in log, "more than the first 8 characters of the key were logged"


def test_denials_are_logged_with_their_code(envoy, http2):
    cases = [
        ([], "missing_api_key"),
        ([("x-api-key", REVOKED)], "key_revoked"),
        ([("x-api-key", SUSPENDED)], "key_suspended"),
    ]
    for headers, code in cases:
        assert envoy.request("GET", "/other", headers, http2=http2).status in (401, 403)
        assert envoy.wait_for_log(r"keygate.*" + code), f"no log line with {code}:\n{envoy.log_tail()}"
    envoy.request("GET", "/v1/admin", [("x-api-key", CLIENT)], http2=http2)
    assert envoy.wait_for_log(r"insufficient_permissions.*client-1"), envoy.log_tail()


def test_no_plaintext_key_is_ever_logged(envoy):
    # Runs after the tests above in this module: everything they sent is in the log now.
    for k in ALL_PLAINTEXTS:
        envoy.request("GET", "/v1/admin", [("x-api-key", k)])
        envoy.request("GET", "/other", [("authorization", f"Bearer {k}")], http2=True)
    envoy.request("GET", "/other", [("x-api-key", CLIENT), ("x-api-key", ADMIN)])
    assert envoy.wait_for_log(r"keygate: denied"), envoy.log_tail()
    log = envoy.log()
    leaked = [k[:12] + "..." for k in ALL_PLAINTEXTS if k in log]
    assert not leaked, f"plaintext keys in the Envoy log: {leaked}"
