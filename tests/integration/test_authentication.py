"""401s: finding the key, refusing missing, unknown, malformed, ambiguous, revoked keys."""

import pytest

from catalog import (
    ADMIN, BARE, CLIENT, EXPIRED, KEY15, KEY16, KEY512, KEY513, KEY_TAB, KEY_U12, KEY_U16,
    KEY_U512, KEY_U513, MAIN_CONFIG, READER, REVOKED, UNKNOWN, assert_allowed, assert_denied,
    keygate_headers,
)


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


# ----------------------------------------------------------------------------- missing


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/admin/users", "/other", "/"])
def test_no_key_is_401_missing(envoy, http2, path):
    r = envoy.request("POST", path, [], http2=http2)
    assert_denied(r, "missing_api_key")


def test_empty_x_api_key_is_401(envoy, http2):
    r = envoy.request("GET", "/other", [("x-api-key", "")], http2=http2)
    assert r.status == 401, r
    assert r.json()["error"] in ("missing_api_key", "invalid_api_key"), r
    assert_denied(r, r.json()["error"])


def test_basic_authorization_is_not_an_api_key(envoy, http2):
    r = envoy.request("GET", "/other", [("authorization", "Basic dXNlcjpwYXNzd29yZA==")], http2=http2)
    assert_denied(r, "missing_api_key")


def test_basic_authorization_with_the_key_as_credentials_is_not_an_api_key(envoy, http2):
    # A valid key under another scheme is still no key.
    r = envoy.request("GET", "/other", [("authorization", f"Basic {CLIENT}")], http2=http2)
    assert_denied(r, "missing_api_key")


def test_bare_authorization_value_is_not_an_api_key(envoy, http2):
    r = envoy.request("GET", "/other", [("authorization", CLIENT)], http2=http2)
    assert_denied(r, "missing_api_key")


# ----------------------------------------------------------------------------- sources


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", CLIENT)],
        [("X-API-KEY", CLIENT)],
        [("authorization", f"Bearer {CLIENT}")],
        [("authorization", f"bearer {CLIENT}")],
        [("Authorization", f"BEARER {CLIENT}")],
    ],
    ids=["x-api-key", "X-API-KEY", "Bearer", "bearer", "BEARER"],
)
def test_valid_key_in_each_source_is_allowed(envoy, http2, headers):
    echo = assert_allowed(envoy.request("GET", "/other", headers, http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"


def test_basic_authorization_plus_valid_x_api_key_is_allowed(envoy, http2):
    basic = "Basic dXNlcjpwYXNzd29yZA=="
    echo = assert_allowed(
        envoy.request("GET", "/other", [("authorization", basic), ("x-api-key", CLIENT)], http2=http2)
    )
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"
    # Only the headers that carried the key are removed.
    assert echo["headers"].get("authorization") == basic, echo
    assert "x-api-key" not in echo["headers"], echo


def test_same_key_twice_in_x_api_key_is_allowed(envoy, http2):
    echo = assert_allowed(
        envoy.request("GET", "/other", [("x-api-key", CLIENT), ("x-api-key", CLIENT)], http2=http2)
    )
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"
    assert "x-api-key" not in echo["headers"], echo


@pytest.mark.parametrize(
    "second", [UNKNOWN, ADMIN, READER], ids=["unknown", "other-valid-key", "same-tenant-valid-key"]
)
def test_two_different_values_in_x_api_key_are_invalid(envoy, http2, second):
    for headers in ([("x-api-key", CLIENT), ("x-api-key", second)],
                    [("x-api-key", second), ("x-api-key", CLIENT)]):
        r = envoy.request("GET", "/other", headers, http2=http2)
        assert_denied(r, "invalid_api_key")


def test_same_key_in_x_api_key_and_bearer_is_allowed(envoy, http2):
    echo = assert_allowed(
        envoy.request(
            "GET", "/other", [("x-api-key", CLIENT), ("authorization", f"Bearer {CLIENT}")], http2=http2
        )
    )
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"
    assert "x-api-key" not in echo["headers"] and "authorization" not in echo["headers"], echo


@pytest.mark.parametrize(
    "headers",
    [
        [("x-api-key", CLIENT), ("authorization", f"Bearer {ADMIN}")],
        [("x-api-key", ADMIN), ("authorization", f"Bearer {CLIENT}")],
        [("x-api-key", CLIENT), ("authorization", f"Bearer {UNKNOWN}")],
        [("authorization", f"Bearer {CLIENT}"), ("x-api-key", UNKNOWN)],
    ],
    ids=["valid+other-valid", "other-valid+valid", "valid+unknown-bearer", "bearer+unknown-x-api-key"],
)
def test_different_keys_in_two_sources_are_invalid(envoy, http2, headers):
    assert_denied(envoy.request("GET", "/other", headers, http2=http2), "invalid_api_key")


def test_two_bearer_headers_with_different_keys_are_invalid(envoy, http2):
    headers = [("authorization", f"Bearer {CLIENT}"), ("authorization", f"Bearer {ADMIN}")]
    assert_denied(envoy.request("GET", "/other", headers, http2=http2), "invalid_api_key")


def test_two_bearer_headers_with_the_same_key_are_allowed(envoy, http2):
    headers = [("authorization", f"Bearer {CLIENT}"), ("authorization", f"Bearer {CLIENT}")]
    echo = assert_allowed(envoy.request("GET", "/other", headers, http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1"
    assert "authorization" not in echo["headers"], echo


# ----------------------------------------------------------------------------- invalid keys


def test_unknown_key_is_401_invalid(envoy, http2):
    for headers in ([("x-api-key", UNKNOWN)], [("authorization", f"Bearer {UNKNOWN}")]):
        assert_denied(envoy.request("GET", "/other", headers, http2=http2), "invalid_api_key")


def test_key_differing_only_in_case_is_invalid(envoy, http2):
    r = envoy.request("GET", "/other", [("x-api-key", CLIENT.upper())], http2=http2)
    assert_denied(r, "invalid_api_key")


def test_hash_sent_as_key_is_invalid(envoy, http2):
    from harness import key_hash

    for sent in (key_hash(CLIENT), key_hash(CLIENT)[len("sha256:"):]):
        r = envoy.request("GET", "/other", [("x-api-key", sent)], http2=http2)
        assert_denied(r, "invalid_api_key")


@pytest.mark.parametrize(
    "key,key_id",
    [(KEY16, "len16"), (KEY512, "len512"), (KEY_U16, "utf8-16"), (KEY_U512, "utf8-512")],
    ids=["16-chars", "512-chars", "16-utf8-chars", "512-utf8-chars"],
)
def test_keys_at_the_length_limits_are_allowed(envoy, http2, key, key_id):
    for headers in ([("x-api-key", key.encode())], [("authorization", b"Bearer " + key.encode())]):
        echo = assert_allowed(envoy.request("GET", "/other", headers, http2=http2))
        assert keygate_headers(echo)["x-keygate-key-id"] == key_id


@pytest.mark.parametrize(
    "key",
    [KEY15, KEY513, KEY_TAB, KEY_U12, KEY_U513],
    ids=["15-chars", "513-chars", "tab-inside", "12-utf8-chars-24-bytes", "513-utf8-chars"],
)
def test_malformed_keys_are_invalid_even_when_their_hash_is_configured(envoy, http2, key):
    # The digests of these keys are in the configuration: only the shape check stops them.
    for headers in ([("x-api-key", key.encode())], [("authorization", b"Bearer " + key.encode())]):
        assert_denied(envoy.request("GET", "/other", headers, http2=http2), "invalid_api_key")


def test_short_unknown_key_is_invalid(envoy, http2):
    assert_denied(envoy.request("GET", "/other", [("x-api-key", "short")], http2=http2), "invalid_api_key")


def test_revoked_key_is_401(envoy, http2):
    for path in ("/other", "/v1/jobs", "/healthz"):
        r = envoy.request("POST", path, [("x-api-key", REVOKED)], http2=http2)
        assert_denied(r, "key_revoked")


# ----------------------------------------------------------------------------- public routes


def test_public_route_without_key_is_allowed(envoy, http2):
    echo = assert_allowed(envoy.request("GET", "/healthz", [], http2=http2))
    assert echo["path"] == "/healthz"
    assert keygate_headers(echo) == {}, echo


def test_public_route_prefix_and_query(envoy, http2):
    for path in ("/healthz/live", "/healthz?verbose=1"):
        echo = assert_allowed(envoy.request("GET", path, [], http2=http2))
        assert echo["path"] == path


@pytest.mark.parametrize(
    "headers,code",
    [
        ([("x-api-key", UNKNOWN)], "invalid_api_key"),
        ([("authorization", f"Bearer {UNKNOWN}")], "invalid_api_key"),
        ([("x-api-key", KEY15)], "invalid_api_key"),
        ([("x-api-key", CLIENT), ("x-api-key", ADMIN)], "invalid_api_key"),
        ([("x-api-key", REVOKED)], "key_revoked"),
        ([("x-api-key", EXPIRED)], "key_expired"),
    ],
    ids=["unknown", "unknown-bearer", "too-short", "conflicting", "revoked", "expired"],
)
def test_public_route_still_checks_a_key_that_is_sent(envoy, http2, headers, code):
    assert_denied(envoy.request("GET", "/healthz", headers, http2=http2), code)


def test_public_route_with_valid_key_forwards_identity(envoy, http2):
    echo = assert_allowed(envoy.request("GET", "/healthz", [("x-api-key", BARE)], http2=http2))
    assert keygate_headers(echo) == {"x-keygate-key-id": "bare-1", "x-keygate-role": "client"}, echo
    assert "x-api-key" not in echo["headers"], echo


# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize("path", ["/v1/admin", "/v1/jobs"])
def test_authentication_comes_before_authorization(envoy, http2, path):
    # Wrong method, wrong role, wrong tenant: still a 401 first.
    tenant = [("x-tenant-id", "someone-else")]
    assert_denied(envoy.request("DELETE", path, tenant, http2=http2), "missing_api_key")
    assert_denied(
        envoy.request("DELETE", path, tenant + [("x-api-key", UNKNOWN)], http2=http2), "invalid_api_key"
    )
    assert_denied(
        envoy.request("DELETE", path, tenant + [("x-api-key", REVOKED)], http2=http2), "key_revoked"
    )
    assert_denied(
        envoy.request("DELETE", path, tenant + [("x-api-key", EXPIRED)], http2=http2), "key_expired"
    )
