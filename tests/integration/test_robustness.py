"""Hostile input: non-UTF-8 bytes, oversized keys, many headers. Envoy keeps serving."""

import pytest

from catalog import CLIENT, MAIN_CONFIG, assert_allowed, assert_denied, keygate_headers


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


def still_serving(envoy, http2):
    assert envoy.alive(), f"Envoy died; log tail:\n{envoy.log_tail()}"
    echo = assert_allowed(envoy.request("POST", "/v1/jobs", [("x-api-key", CLIENT)], http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"


NON_UTF8 = [
    b"\xff\xfe" + b"a" * 30,
    b"kg_test_\xc3\x28_invalid_utf8_seq",
    CLIENT.encode()[:-2] + b"\x80\x81",
    b"\xe9" * 40,
]


@pytest.mark.parametrize("value", NON_UTF8, ids=["ff-fe", "bad-2-byte", "valid-prefix", "latin1"])
def test_non_utf8_key_is_invalid(envoy, http2, value):
    assert_denied(envoy.request("GET", "/other", [("x-api-key", value)], http2=http2), "invalid_api_key")
    assert_denied(
        envoy.request("GET", "/other", [("authorization", b"Bearer " + value)], http2=http2),
        "invalid_api_key",
    )
    still_serving(envoy, http2)


def test_non_utf8_in_other_headers_does_not_break_a_valid_request(envoy, http2):
    headers = [("x-other", b"\xff\xfe\xfd"), ("x-keygate-role", b"\xc0admin"), ("x-api-key", CLIENT)]
    echo = assert_allowed(envoy.request("GET", "/other", headers, http2=http2))
    assert keygate_headers(echo)["x-keygate-role"] == "client", echo
    still_serving(envoy, http2)


def test_non_utf8_tenant_is_refused_or_overridden(envoy, http2):
    r = envoy.request("GET", "/other", [("x-api-key", CLIENT), ("x-tenant-id", b"test-tenant\xff")], http2=http2)
    if r.status == 403:
        assert_denied(r, "tenant_mismatch")
    else:
        assert assert_allowed(r)["headers"].get("x-tenant-id") == "test-tenant", r
    still_serving(envoy, http2)


@pytest.mark.parametrize("length", [600, 4096, 30000])
def test_oversized_key_is_invalid(envoy, http2, length):
    big = "k" * length
    assert_denied(envoy.request("GET", "/other", [("x-api-key", big)], http2=http2), "invalid_api_key")
    assert_denied(
        envoy.request("GET", "/other", [("authorization", f"Bearer {big}")], http2=http2), "invalid_api_key"
    )
    still_serving(envoy, http2)


def test_many_key_headers(envoy, http2):
    same = [("x-api-key", CLIENT)] * 50
    echo = assert_allowed(envoy.request("GET", "/other", same, http2=http2))
    assert "x-api-key" not in echo["headers"], echo
    one_off = same[:25] + [("x-api-key", CLIENT + "x")] + same[25:]
    assert_denied(envoy.request("GET", "/other", one_off, http2=http2), "invalid_api_key")
    still_serving(envoy, http2)


def test_many_spoofed_identity_headers(envoy, http2):
    spoofed = [(f"x-keygate-h{i}", "spoof") for i in range(60)]
    echo = assert_allowed(envoy.request("GET", "/other", spoofed + [("x-api-key", CLIENT)], http2=http2))
    assert set(keygate_headers(echo)) == {
        "x-keygate-key-id", "x-keygate-role", "x-keygate-client", "x-keygate-scopes"
    }, echo
    still_serving(envoy, http2)


def test_weird_bearer_values(envoy, http2):
    for value in ("Bearer", "Bearer ", "Bearer    ", "Bearer\t", "Bearer ,", ",", "Bearer " + CLIENT + " extra"):
        r = envoy.request("GET", "/other", [("authorization", value)], http2=http2)
        assert r.status == 401, f"{value!r}: {r}"
        assert r.json()["error"] in ("missing_api_key", "invalid_api_key"), f"{value!r}: {r}"
    still_serving(envoy, http2)
