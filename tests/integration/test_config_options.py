"""Configuration options: allow_cors_preflight, realm, key_sources, and the defaults."""

import pytest

from catalog import (
    ALT_CONFIG, ALT_REALM, CLIENT, MAIN_CONFIG, UNKNOWN, assert_allowed, assert_denied,
    keygate_headers,
)

PREFLIGHT = [
    ("Origin", "https://app.example.com"),
    ("Access-Control-Request-Method", "POST"),
    ("Access-Control-Request-Headers", "x-api-key, content-type"),
]


@pytest.fixture(scope="module")
def envoy_default(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


@pytest.fixture(scope="module")
def envoy_cors(module_envoy_starter):
    """allow_cors_preflight: true, realm edge-api."""
    return module_envoy_starter(ALT_CONFIG)


# ----------------------------------------------------------------------------- CORS


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/admin/users", "/other"])
def test_preflight_passes_without_key_when_allowed(envoy_cors, http2, path):
    echo = assert_allowed(envoy_cors.request("OPTIONS", path, PREFLIGHT, http2=http2))
    assert echo["method"] == "OPTIONS" and echo["path"] == path, echo
    assert echo["headers"].get("origin") == "https://app.example.com", echo
    assert keygate_headers(echo) == {}, echo


def test_preflight_does_not_carry_spoofed_identity(envoy_cors, http2):
    spoofed = [("x-keygate-key-id", "admin-1"), ("x-keygate-role", "admin")]
    echo = assert_allowed(envoy_cors.request("OPTIONS", "/v1/admin", PREFLIGHT + spoofed, http2=http2))
    assert keygate_headers(echo) == {}, echo


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("Origin", "https://app.example.com")],
        [("Access-Control-Request-Method", "POST")],
    ],
    ids=["no-cors-headers", "origin-only", "request-method-only"],
)
def test_options_that_is_not_a_preflight_needs_a_key(envoy_cors, http2, headers):
    r = envoy_cors.request("OPTIONS", "/v1/jobs", headers, http2=http2)
    assert_denied(r, "missing_api_key", realm=ALT_REALM)


def test_preflight_headers_on_other_methods_do_not_bypass(envoy_cors, http2):
    for method in ("GET", "POST", "DELETE"):
        r = envoy_cors.request(method, "/v1/jobs", PREFLIGHT, http2=http2)
        assert_denied(r, "missing_api_key", realm=ALT_REALM)


def test_preflight_needs_a_key_by_default(envoy_default, http2):
    r = envoy_default.request("OPTIONS", "/v1/jobs", PREFLIGHT, http2=http2)
    assert_denied(r, "missing_api_key")


# ----------------------------------------------------------------------------- realm


def test_custom_realm_on_every_401(envoy_cors, http2):
    assert_denied(envoy_cors.request("GET", "/other", [], http2=http2), "missing_api_key", realm=ALT_REALM)
    assert_denied(
        envoy_cors.request("GET", "/other", [("x-api-key", UNKNOWN)], http2=http2),
        "invalid_api_key",
        realm=ALT_REALM,
    )


def test_custom_realm_not_on_403(envoy_cors, http2):
    r = envoy_cors.request("GET", "/v1/admin", [("x-api-key", CLIENT)], http2=http2)
    assert_denied(r, "insufficient_permissions", realm=ALT_REALM)


@pytest.fixture(scope="module")
def envoy_defaults(module_envoy_starter):
    """Only keys and routes: every other field at its default."""
    return module_envoy_starter({"keys": MAIN_CONFIG["keys"], "routes": MAIN_CONFIG["routes"]})


def test_defaults(envoy_defaults, http2):
    # realm "keygate"
    assert_denied(envoy_defaults.request("GET", "/other", [], http2=http2), "missing_api_key")
    # key sources: x-api-key, then Authorization: Bearer; strip_credentials: true
    for headers in ([("x-api-key", CLIENT)], [("authorization", f"Bearer {CLIENT}")]):
        echo = assert_allowed(envoy_defaults.request("GET", "/other", headers, http2=http2))
        assert keygate_headers(echo)["x-keygate-key-id"] == "client-1", echo
        assert "x-api-key" not in echo["headers"] and "authorization" not in echo["headers"], echo
    # allow_cors_preflight: false
    r = envoy_defaults.request("OPTIONS", "/v1/jobs", PREFLIGHT, http2=http2)
    assert_denied(r, "missing_api_key")


# ----------------------------------------------------------------------------- key sources


@pytest.fixture(scope="module")
def envoy_sources(module_envoy_starter):
    return module_envoy_starter(
        dict(
            MAIN_CONFIG,
            key_sources=[{"header": "X-Token"}, {"header": "authorization", "scheme": "ApiKey"}],
        )
    )


@pytest.mark.parametrize(
    "headers",
    [[("x-token", CLIENT)], [("authorization", f"ApiKey {CLIENT}")], [("authorization", f"apikey {CLIENT}")]],
    ids=["x-token", "ApiKey", "apikey"],
)
def test_custom_key_sources(envoy_sources, http2, headers):
    echo = assert_allowed(envoy_sources.request("GET", "/other", headers, http2=http2))
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1", echo
    assert "x-token" not in echo["headers"] and "authorization" not in echo["headers"], echo


@pytest.mark.parametrize(
    "headers",
    [[("x-api-key", CLIENT)], [("authorization", f"Bearer {CLIENT}")]],
    ids=["x-api-key", "Bearer"],
)
def test_unconfigured_sources_are_ignored(envoy_sources, http2, headers):
    assert_denied(envoy_sources.request("GET", "/other", headers, http2=http2), "missing_api_key")


def test_custom_sources_disagreeing_are_invalid(envoy_sources, http2):
    headers = [("x-token", CLIENT), ("authorization", f"ApiKey {UNKNOWN}")]
    assert_denied(envoy_sources.request("GET", "/other", headers, http2=http2), "invalid_api_key")
