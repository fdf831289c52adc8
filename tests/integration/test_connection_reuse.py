"""Per-request state: requests sharing one connection (HTTP/1.1 keep-alive, or streams
of one HTTP/2 connection) are each decided on their own headers."""

import pytest

from catalog import (
    ADMIN, ADMIN_IDENTITY, CLIENT, CLIENT_IDENTITY, MAIN_CONFIG, UNKNOWN, assert_allowed,
    assert_denied, keygate_headers,
)
from harness import Transfer


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


def test_identity_does_not_leak_between_requests_on_one_connection(envoy):
    # HTTP/1.1 keep-alive (see test_h2_streams_on_one_connection for HTTP/2).
    http2 = False
    rs = envoy.request_sequence(
        [
            Transfer("GET", "/other", [("x-api-key", CLIENT)]),
            Transfer("GET", "/other", []),
            Transfer("GET", "/healthz", []),
            Transfer("GET", "/v1/admin", [("authorization", f"Bearer {ADMIN}")]),
            Transfer("GET", "/v1/admin", [("x-api-key", CLIENT)]),
            Transfer("GET", "/other", [("x-api-key", UNKNOWN)]),
            Transfer("POST", "/v1/jobs", [("x-api-key", CLIENT)], body=b"{}"),
            Transfer("GET", "/healthz", [("x-keygate-role", "admin")]),
        ],
        http2=http2,
    )
    assert [r.http_version for r in rs] == ["2" if http2 else "1.1"] * len(rs)
    assert keygate_headers(assert_allowed(rs[0])) == CLIENT_IDENTITY
    assert_denied(rs[1], "missing_api_key")
    assert keygate_headers(assert_allowed(rs[2])) == {}
    assert keygate_headers(assert_allowed(rs[3])) == ADMIN_IDENTITY
    assert_denied(rs[4], "insufficient_permissions")
    assert_denied(rs[5], "invalid_api_key")
    echo = assert_allowed(rs[6])
    assert keygate_headers(echo) == CLIENT_IDENTITY and echo["body_bytes"] == 2, echo
    assert keygate_headers(assert_allowed(rs[7])) == {}


def test_many_requests_on_one_connection(envoy):
    http2 = False
    transfers = []
    for i in range(20):
        transfers.append(Transfer("GET", f"/other/{i}", [("x-api-key", CLIENT if i % 2 else ADMIN)]))
        transfers.append(Transfer("GET", f"/other/{i}", []))
    rs = envoy.request_sequence(transfers, http2=http2)
    for i in range(20):
        echo = assert_allowed(rs[2 * i])
        assert keygate_headers(echo) == (CLIENT_IDENTITY if i % 2 else ADMIN_IDENTITY), echo
        assert echo["path"] == f"/other/{i}"
        assert_denied(rs[2 * i + 1], "missing_api_key")


def test_h2_streams_on_one_connection(envoy):
    # Concurrent streams of one connection, each decided on its own path and key.
    paths = ["/other", "/v1/admin", "/healthz", "/v1/jobs", "/other?2", "/v1/admin/x"]
    got = envoy.h2_multiplexed(paths, [("x-api-key", CLIENT)])
    assert [status for status, _ in got] == [200, 403, 200, 403, 200, 403], got
    got = envoy.h2_multiplexed(paths, [("x-api-key", ADMIN)])
    assert [status for status, _ in got] == [200, 200, 200, 403, 200, 200], got
    got = envoy.h2_multiplexed(paths, [])
    assert [status for status, _ in got] == [401, 401, 200, 401, 401, 401], got
    for status, headers in got:
        if status == 401:
            assert headers.get("www-authenticate") == 'ApiKey realm="keygate"', got
    paths = [f"/other/{i}" for i in range(30)]
    got = envoy.h2_multiplexed(paths, [("x-api-key", UNKNOWN)])
    assert [status for status, _ in got] == [401] * 30, got
