"""expires_at: past, future, offsets, and a key that expires while Envoy runs."""

import datetime
import time

import pytest

from catalog import (
    CLIENT, EXPIRED, MAIN_CONFIG, OFFSET, assert_allowed, assert_denied, config, keygate_headers,
)
from harness import key_hash


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


def test_expired_key_is_401(envoy, http2):
    for headers in ([("x-api-key", EXPIRED)], [("authorization", f"Bearer {EXPIRED}")]):
        for path in ("/other", "/v1/jobs", "/healthz"):
            assert_denied(envoy.request("POST", path, headers, http2=http2), "key_expired")


@pytest.mark.parametrize("k,key_id", [(CLIENT, "client-1"), (OFFSET, "offset-1")], ids=["Z", "offset"])
def test_key_expiring_in_the_future_is_allowed(envoy, http2, k, key_id):
    echo = assert_allowed(envoy.request("POST", "/v1/jobs", [("x-api-key", k)], http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == key_id


def rfc3339(ts: float, offset_hours: int = 0) -> str:
    tz = datetime.timezone(datetime.timedelta(hours=offset_hours))
    return datetime.datetime.fromtimestamp(int(ts), tz).isoformat()


def test_expiry_uses_the_offset(start_envoy, http2):
    # The same instants written with offsets: one hour in the past expressed in +05:00
    # looks like a future wall time to a parser that ignores the offset.
    now = time.time()
    past = rfc3339(now - 3600, offset_hours=5)
    future = rfc3339(now + 3600, offset_hours=-5)
    soon = "kg_test_offset_past_000000000"
    later = "kg_test_offset_future_0000000"
    keys = [
        {"id": "past-offset", "hash": key_hash(soon), "role": "client", "expires_at": past},
        {"id": "future-offset", "hash": key_hash(later), "role": "client", "expires_at": future},
    ]
    envoy = start_envoy(config(keys=keys))
    assert_denied(envoy.request("GET", "/other", [("x-api-key", soon)], http2=http2), "key_expired")
    echo = assert_allowed(envoy.request("GET", "/other", [("x-api-key", later)], http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == "future-offset"


def test_key_expires_while_envoy_runs(start_envoy):
    # One test for both protocols: it waits for the wall clock.
    k = "kg_test_expiring_soon_1234567"
    expires = int(time.time()) + 4
    keys = [{"id": "soon-1", "hash": key_hash(k), "role": "client",
             "expires_at": rfc3339(expires)}]
    envoy = start_envoy(config(keys=keys))
    for http2 in (False, True):
        r = envoy.request("GET", "/other", [("x-api-key", k)], http2=http2)
        assert time.time() < expires - 0.2, "Envoy took too long to start for this test to mean anything"
        assert_allowed(r)
    time.sleep(max(0.0, expires - time.time()) + 0.5)
    for http2 in (False, True):
        assert_denied(envoy.request("GET", "/other", [("x-api-key", k)], http2=http2), "key_expired")
