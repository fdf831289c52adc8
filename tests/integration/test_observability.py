"""Counters at the admin endpoint, and what the log says (and never says)."""

import re
import secrets
import time

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


def test_a_flood_of_denials_is_not_a_flood_of_log_lines(start_envoy):
    """At most 100 denial lines a second per worker: 3,000 bad keys sent as fast as
    h2load can (a fraction of a second per thousand here) log far fewer lines, all
    counted, and the next line written says how many were left out."""
    import subprocess

    envoy = start_envoy(MAIN_CONFIG, concurrency=2)
    sent = 3000
    before = envoy.counter("keygate_unauthorized")
    proc = subprocess.run(
        ["h2load", "--h1", "-n", str(sent), "-c", "8", "-H", "x-api-key: zz_flood_not_a_key_0000",
         f"http://127.0.0.1:{envoy.port}/other"],
        capture_output=True, text=True, timeout=60,
    )
    assert f"status codes: 0 2xx, 0 3xx, {sent} 4xx, 0 5xx" in proc.stdout, proc.stdout
    assert envoy.counter("keygate_unauthorized") - before == sent
    m = re.search(r"finished in ([\d.]+)(m?s)", proc.stdout)
    seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    flood = envoy.wait_for_log(r"keygate: denied 401 invalid_api_key GET /other key_prefix=\"zz_flood\"")
    assert flood, envoy.log_tail()
    # Two workers, 100 lines a second each, over the seconds the flood took (plus the
    # partial seconds at either end).
    assert len(flood) <= 200 * (int(seconds) + 2), (len(flood), seconds)
    assert len(flood) < sent
    # A second later, one more denial on each worker reports what was skipped: enough
    # requests, each on a new connection, that both workers get some.
    time.sleep(1.1)
    for _ in range(40):
        envoy.request("GET", "/other", [("x-api-key", "zz_flood_not_a_key_0000")])
    notes = envoy.wait_for_log(r"earlier denials not logged: over 100 a second")
    assert notes, envoy.log_tail()
    skipped = sum(int(re.search(r"\((\d+) earlier denials", line).group(1)) for line in notes)
    logged = len(envoy.wait_for_log(r"key_prefix=\"zz_flood\""))
    # Every denial is either a line or counted in a note (the last few may still be
    # pending in a worker that got no request after them).
    assert skipped + logged <= sent + 40
    assert skipped + logged >= sent - 200, (skipped, logged)
