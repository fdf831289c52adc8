"""Issue 11 in a real Envoy: what an attacker sends to slip past a rule.

Every class is a generated matrix: HTTP/1.1 and h2c, the shipped (docs/envoy.md) connection-manager
settings and Envoy's own defaults, and the variants of each trick. Requests are written
byte for byte (harness.raw_h1, harness.RawH2): curl refuses to send some of them.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest

from catalog import ADMIN, CLIENT, KEYS
from harness import RawH2, raw_h1

HCMS = ["readme", "defaults"]

CONFIG = {
    "keys": KEYS,
    "routes": [
        {"prefix": "/healthz", "public": True},
        {"prefix": "/v1/admin", "roles": ["admin"]},
        {"prefix": "/", "roles": ["client", "admin"]},
    ],
    "ip_rules": {"deny": ["203.0.113.7"]},
    "trusted_proxies": ["127.0.0.1"],
    "health_path": "/keygate/health",
}


@pytest.fixture(scope="module", params=HCMS)
def envoy(request, module_envoy_starter):
    return module_envoy_starter(CONFIG, hcm=request.param)


@pytest.fixture(params=["http1", "h2c"])
def send(request, envoy):
    """send(method, path, headers) -> RawResponse | None over one protocol."""
    if request.param == "http1":
        yield lambda m, p, hs=(): raw_h1(envoy.port, m, p, hs)
        return
    conns: list[RawH2] = []

    def h2(m, p, hs=()):
        if not conns or conns[-1].closed:
            conns.append(RawH2(envoy.port))
        return conns[-1].request(m, p, hs)

    yield h2
    for c in conns:
        c.close()


def key(k: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-api-key", k.encode())]


def assert_not_upstream(r, what):
    """Envoy or keygate refused it: nothing reached the upstream (which answers 200)."""
    assert r is None or r.status != 200, f"{what} reached the upstream: {r}"
    if r is not None and r.status == 400 and r.header("content-type") == "application/json":
        assert r.json() == {"error": "invalid_request", "message": "Request could not be parsed"}, r


# ---------------------------------------------------------------------------- 1. unreadable


def test_unreadable_paths_are_refused_never_matched_as_no_rule(envoy, send):
    # The catch-all rule admits clients, the admin rule only admins: an unreadable path
    # read as "" (no rule) would let the client key through /v1/admin.
    bad = [b"/v1/admin/users?\xff", b"/v1/admin?\x80x", b"/v1/admin/\xc3\x28"]
    bad += [b"/v1/admin/users?q=" + bytes([b]) for b in range(0x80, 0x100, 7)]
    bad += [b"/v1/admin/" + bytes([b]) for b in range(0x80, 0x100, 11)]
    bad += [b"/v1/admin#x", b"/v1/admin%00.json", b"/v1/admin/%0d%0a"]
    for path in bad:
        # (With normalize_path, Envoy escapes raw bytes above 0x7e itself, so the admin key
        # may pass as it would for the escaped path; the client key never does.)
        assert_not_upstream(send(b"GET", path, key(CLIENT)), path)
    # The issue's own example, over h2c where Envoy passes it to filters: keygate's 400.
    r = send(b"GET", b"/v1/admin/users?\xff", key(CLIENT))
    if r is not None and r.header("content-type") == "application/json":
        assert r.status == 400 and r.json()["error"] == "invalid_request", r


def test_unreadable_methods_are_refused(envoy, send):
    for method in [b"GE\xffT", b"G(T", b"\xc3\xa9"]:
        r = send(method, b"/v1/admin", key(CLIENT))
        assert_not_upstream(r, method)


# ---------------------------------------------------------------------------- 2. path forms


def admin_variants() -> list[bytes]:
    out = [
        "/v1/admin;jsessionid=x", "/v1;x=1/admin", "/v1/admin;/users", "/v1/x/..;/admin",
        "/v1/ADMIN", "/V1/Admin/users", "/v1//admin", "/v1/./admin", "/v1/x/../admin",
        "/x/../v1/admin", "/v1\\admin", "/v1%5cadmin", "/v1%2fadmin", "/v1%2Fadmin/users",
        "/v1/%2e/admin", "/v1/x/%2E%2E/admin", "/v1/admin%3bx", "/healthz/..;/v1/admin",
        "/healthz/%2e%2e/v1/admin",
    ]
    for i in range(5):
        out.append("/v1/" + "".join(f"%{ord(c):02X}" if j == i else c for j, c in enumerate("admin")))
    return [p.encode() for p in out]


def test_no_path_form_reaches_the_admin_route_with_a_client_key(envoy, send):
    for path in admin_variants():
        assert_not_upstream(send(b"GET", path, key(CLIENT)), path)
    # The admin key does get through (Envoy may redirect some forms first).
    r = send(b"GET", b"/v1/admin;jsessionid=x", key(ADMIN))
    assert r is not None and r.status == 200, r
    r = send(b"GET", b"/v1/ADMIN", key(ADMIN))
    assert r is not None and r.status == 200, r
    # And the client key reaches what it may.
    r = send(b"GET", b"/v1/jobs", key(CLIENT))
    assert r is not None and r.status == 200, r


def test_public_route_tricks_still_need_a_key(envoy, send):
    for path in [b"/healthz/../v1/admin", b"/healthz/..;/v1/jobs", b"/healthz;/../v1/jobs",
                 b"/HEALTHZ/x", b"/healthz%2f..%2fv1"]:
        r = send(b"GET", path)
        assert r is None or r.status in (301, 302, 307, 308, 400, 401, 404), (path, r)
        if r is not None and r.status == 401:
            assert r.json()["error"] == "missing_api_key", r


# ---------------------------------------------------------------------------- identity headers


def test_underscore_identity_headers_never_reach_the_upstream(envoy, send):
    spoofed = [
        (b"x_keygate_role", b"admin"), (b"x_keygate_key_id", b"admin-1"),
        (b"x-keygate_scopes", b"all"), (b"x_tenant_id", b"other-tenant"),
        (b"x-keygate-role", b"admin"),
    ]
    r = send(b"GET", b"/v1/jobs", key(CLIENT) + spoofed)
    assert r is not None and r.status == 200, r
    received = json.loads(r.body)["headers"]
    for name in ["x_keygate_role", "x_keygate_key_id", "x-keygate_scopes", "x_tenant_id"]:
        assert name not in received, (name, received)
    assert received["x-keygate-role"] == "client"
    assert received["x-tenant-id"] == "test-tenant"


# ---------------------------------------------------------------------------- 3./4. addresses


def test_forwarded_for_from_a_trusted_proxy(envoy, send):
    if envoy.hcm != "readme":
        pytest.skip("with Envoy's defaults every X-Forwarded-For fails closed (next test)")
    # The client's part (left of what the proxy appended) never decides.
    for xff in [[b"junk, 203.0.113.7"], [b"junk", b"203.0.113.7"], [b"\xff\xfe, 203.0.113.7"],
                [b"1.2.3.4 5.6.7.8, 203.0.113.7"]]:
        r = send(b"GET", b"/v1/jobs", key(CLIENT) + [(b"x-forwarded-for", v) for v in xff])
        assert r is not None and r.status == 403 and r.json()["error"] == "ip_not_allowed", (xff, r)
    # A malformed deciding entry: the client is unknown, refused (never the proxy's address).
    for xff in [[b"203.0.113.7, junk"], [b"203.0.113.7", b"junk"], [b"203.0.113.7,"]]:
        r = send(b"GET", b"/v1/jobs", key(CLIENT) + [(b"x-forwarded-for", v) for v in xff])
        assert r is not None and r.status == 403, (xff, r)
        assert r.json() == {"error": "client_address_unknown",
                            "message": "Client address could not be determined"}, r
    r = send(b"GET", b"/v1/jobs", key(CLIENT) + [(b"x-forwarded-for", b"198.51.100.1")])
    assert r is not None and r.status == 200, r


def test_an_address_envoy_took_from_the_request_fails_closed(envoy, send):
    if envoy.hcm != "defaults":
        pytest.skip("only Envoy's default use_remote_address: false takes it from the request")
    before = envoy.counter("keygate_client_address_from_request")
    # Without use_remote_address, Envoy makes 198.51.100.1 the client: a deny rule could be
    # escaped (or another client's budget spent) with one header.
    for xff in [b"198.51.100.1", b"203.0.113.7", b"127.0.0.1"]:
        r = send(b"GET", b"/v1/jobs", key(CLIENT) + [(b"x-forwarded-for", xff)])
        assert r is not None and r.status == 403, r
        assert r.json()["error"] == "client_address_unknown", r
    assert envoy.counter("keygate_client_address_from_request") >= before + 3
    lines = envoy.wait_for_log("keygate: Envoy gave the client address from the request", timeout=5)
    assert 1 <= len(lines) <= 2, lines  # once per worker (--concurrency 2)
    assert "use_remote_address: true" in lines[0]
    # Without the header, the connection's peer counts as usual.
    r = send(b"GET", b"/v1/jobs", key(CLIENT))
    assert r is not None and r.status == 200, r


# ---------------------------------------------------------------------------- 7. readiness


def test_health_path_is_answered_by_keygate(envoy, send):
    r = send(b"GET", b"/keygate/health")
    assert r is not None and r.status == 200 and r.json() == {"status": "ready"}, r
    r = send(b"POST", b"/keygate/health")
    assert r is not None and r.status == 401, r


def test_a_broken_module_refuses_to_start_inline(start_envoy, paths, tmp_path):
    """With the filter inline in the bootstrap, Envoy will not start on a bad module."""
    from harness import Envoy

    bad = tmp_path / "keygate.wasm"
    bad.write_bytes(b"\x00asm\x01\x00\x00\x00garbage")
    envoy = Envoy(paths.__class__(bad, paths.envoy, paths.echo, paths.cli), tmp_path,
                  start_envoy.echo.port, CONFIG)
    start_envoy.started.append(envoy)
    envoy.spawn_expecting_failure()
    assert envoy.wait_exit(20) != 0
    assert "Unable to create Wasm plugin keygate" in envoy.log()


def write_ecds(ecds, wasm) -> None:
    """The ECDS file Envoy watches, naming `wasm`, written as `keygate apply` does it (a
    new file in the directory, then a rename over the old one)."""
    tmp = ecds.parent / ".next.yaml"
    tmp.write_text(json.dumps({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "keygate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "keygate", "root_id": "keygate", "fail_open": False,
                "vm_config": {"vm_id": "keygate", "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": str(wasm)}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                  "value": json.dumps(CONFIG)},
            },
        },
    }]}))
    tmp.rename(ecds)


@pytest.mark.parametrize("module", ["garbage", "empty"])
def test_a_broken_module_through_ecds_fails_the_health_path(start_envoy, tmp_path, module):
    """Through ECDS, Envoy starts and calls itself ready with a module it cannot load,
    and answers every request 500 with an empty body; the health path is what tells:
    keygate is not there to answer it."""
    from harness import Ecds

    bad = tmp_path / "keygate.wasm"
    bad.write_bytes(b"\x00asm\x01\x00\x00\x00garbage" if module == "garbage" else b"")
    ecds = tmp_path / "ecds" / "keygate.yaml"
    ecds.parent.mkdir()
    write_ecds(ecds, bad)
    envoy = start_envoy(Ecds(ecds))
    assert envoy.admin_get("/ready").strip() == "LIVE"
    for path in [b"/keygate/health", b"/healthz", b"/v1/jobs"]:
        r = raw_h1(envoy.port, b"GET", path, key(CLIENT))
        assert r is not None and r.status == 500 and r.body == b"", (path, r)


def test_the_health_path_goes_from_500_to_200_when_a_good_module_arrives(start_envoy, paths, tmp_path):
    from harness import Ecds

    ecds = tmp_path / "ecds" / "keygate.yaml"
    ecds.parent.mkdir()

    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"nope")
    write_ecds(ecds, bad)
    envoy = start_envoy(Ecds(ecds))
    assert raw_h1(envoy.port, b"GET", b"/keygate/health").status == 500
    write_ecds(ecds, paths.wasm)
    deadline = time.time() + 10
    while time.time() < deadline:
        r = raw_h1(envoy.port, b"GET", b"/keygate/health")
        if r.status == 200:
            break
        time.sleep(0.2)
    assert r.status == 200 and r.json() == {"status": "ready"}, r


# ---------------------------------------------------------------------------- 5. lockout


def test_a_flood_of_failing_addresses_locks_out_nobody_else(start_envoy):
    envoy = start_envoy(dict(CONFIG, failed_auth_limit={"requests": 2, "per": "hour"}))
    import http.client

    def flood(start: int, count: int) -> list[int]:
        conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=30)
        out = []
        try:
            for i in range(start, start + count):
                xff = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
                conn.request("GET", "/v1/jobs", headers={"X-Api-Key": "wrong_key_000000000000",
                                                         "X-Forwarded-For": xff})
                resp = conn.getresponse()
                resp.read()
                out.append(resp.status)
        finally:
            conn.close()
        return out

    # Far more addresses than the table holds (8,192), one failure each.
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        statuses = [s for part in pool.map(lambda k: flood(k * 5000, 5000), range(4)) for s in part]
    assert statuses.count(401) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    # Every other address, failed or not, still gets in with a valid key.
    for i in range(50):
        r = raw_h1(envoy.port, b"GET", b"/v1/jobs",
                   key(CLIENT) + [(b"x-forwarded-for", f"198.51.{i}.1".encode())])
        assert r is not None and r.status == 200, (i, r)
    # An address that did fail its whole budget is locked out.
    for _ in range(2):
        r = raw_h1(envoy.port, b"GET", b"/v1/jobs",
                   [(b"x-api-key", b"wrong_key_000000000000"), (b"x-forwarded-for", b"192.0.2.99")])
        assert r.status == 401, r
    r = raw_h1(envoy.port, b"GET", b"/v1/jobs", key(CLIENT) + [(b"x-forwarded-for", b"192.0.2.99")])
    assert r.status == 429 and r.json()["error"] == "too_many_failed_attempts", r
