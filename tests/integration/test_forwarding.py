"""What the upstream receives: credentials stripped, identity set, spoofed headers gone."""

import pytest

from catalog import (
    ADMIN, ADMIN_IDENTITY, ALT_CONFIG, BARE, CLIENT, CLIENT_IDENTITY, MAIN_CONFIG, TENANT,
    assert_allowed, keygate_headers,
)

SPOOFED = [
    ("x-keygate-key-id", "admin-1"),
    ("X-Keygate-Role", "admin"),
    ("x-keygate-client", "evil"),
    ("x-keygate-scopes", "everything"),
    ("X-KEYGATE-EXTRA", "1"),
    ("x-keygate-role", "root"),
]


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


@pytest.fixture(scope="module")
def envoy_no_strip(module_envoy_starter):
    return module_envoy_starter(ALT_CONFIG)


def test_identity_headers_and_stripped_key(envoy, http2):
    body = b'{"kind": "render"}'
    echo = assert_allowed(
        envoy.request("POST", "/v1/jobs?x=1", [("x-api-key", CLIENT), ("x-other", "kept")],
                      http2=http2, body=body)
    )
    assert echo["method"] == "POST" and echo["path"] == "/v1/jobs?x=1", echo
    assert echo["body_bytes"] == len(body), echo
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo
    assert echo["headers"].get("x-tenant-id") == TENANT, echo
    assert echo["headers"].get("x-other") == "kept", echo
    assert "x-api-key" not in echo["headers"], echo


def test_bearer_key_is_stripped(envoy, http2):
    echo = assert_allowed(
        envoy.request("GET", "/v1/admin/users", [("Authorization", f"Bearer {ADMIN}")], http2=http2)
    )
    assert keygate_headers(echo) == ADMIN_IDENTITY, echo
    assert "authorization" not in echo["headers"], echo
    assert echo["headers"].get("x-tenant-id") == TENANT, echo


def test_both_carriers_are_stripped(envoy, http2):
    echo = assert_allowed(
        envoy.request(
            "GET", "/other",
            [("x-api-key", CLIENT), ("authorization", f"Bearer {CLIENT}"), ("x-api-key", CLIENT)],
            http2=http2,
        )
    )
    assert "x-api-key" not in echo["headers"] and "authorization" not in echo["headers"], echo
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo


def test_spoofed_identity_headers_are_replaced(envoy, http2):
    echo = assert_allowed(
        envoy.request("POST", "/v1/jobs", SPOOFED + [("x-api-key", CLIENT)], http2=http2)
    )
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo


def test_spoofed_identity_headers_are_removed_on_public_route_without_key(envoy, http2):
    echo = assert_allowed(envoy.request("GET", "/healthz", SPOOFED, http2=http2))
    assert keygate_headers(echo) == {}, echo


def test_spoofed_identity_headers_are_removed_for_a_key_without_client_or_scopes(envoy, http2):
    # bare-1 has neither client nor scopes: the spoofed values must not survive in their place.
    echo = assert_allowed(envoy.request("GET", "/other", SPOOFED + [("x-api-key", BARE)], http2=http2))
    got = keygate_headers(echo)
    assert got.get("x-keygate-key-id") == "bare-1" and got.get("x-keygate-role") == "client", echo
    assert got.get("x-keygate-client") in (None, ""), echo
    assert got.get("x-keygate-scopes") in (None, ""), echo
    assert "x-keygate-extra" not in got, echo


def test_public_route_with_valid_key_gets_identity(envoy, http2):
    echo = assert_allowed(
        envoy.request("GET", "/healthz", SPOOFED + [("authorization", f"Bearer {CLIENT}")], http2=http2)
    )
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo
    assert "authorization" not in echo["headers"], echo
    assert echo["headers"].get("x-tenant-id") == TENANT, echo


def test_tenant_header_is_set_once_when_client_sent_the_same(envoy, http2):
    echo = assert_allowed(
        envoy.request("GET", "/other", [("x-api-key", CLIENT), ("X-Tenant-ID", TENANT)], http2=http2)
    )
    assert echo["headers"].get("x-tenant-id") == TENANT, echo
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo


def test_key_without_tenant_sets_no_tenant(envoy, http2):
    echo = assert_allowed(envoy.request("GET", "/other", [("x-api-key", BARE)], http2=http2))
    assert "x-tenant-id" not in echo["headers"], echo
    assert keygate_headers(echo) == {"x-keygate-key-id": "bare-1", "x-keygate-role": "client"}, echo


def test_key_without_tenant_passes_client_tenant_as_sent(envoy, http2):
    # docs/configuration.md, "What the upstream sees": a key without a tenant is not bound to one.
    echo = assert_allowed(
        envoy.request("GET", "/other", [("x-api-key", BARE), ("x-tenant-id", "any-tenant")], http2=http2)
    )
    assert echo["headers"].get("x-tenant-id") == "any-tenant", echo
    assert keygate_headers(echo)["x-keygate-key-id"] == "bare-1", echo


def test_strip_credentials_false_forwards_the_key(envoy_no_strip, http2):
    echo = assert_allowed(envoy_no_strip.request("GET", "/other", [("x-api-key", CLIENT)], http2=http2))
    assert echo["headers"].get("x-api-key") == CLIENT, echo
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo

    echo = assert_allowed(
        envoy_no_strip.request("GET", "/other", [("authorization", f"Bearer {CLIENT}")], http2=http2)
    )
    assert echo["headers"].get("authorization") == f"Bearer {CLIENT}", echo
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo


def test_strip_credentials_false_still_removes_spoofed_identity(envoy_no_strip, http2):
    echo = assert_allowed(
        envoy_no_strip.request("GET", "/other", SPOOFED + [("x-api-key", CLIENT)], http2=http2)
    )
    assert keygate_headers(echo) == CLIENT_IDENTITY, echo
    echo = assert_allowed(envoy_no_strip.request("GET", "/healthz", SPOOFED, http2=http2))
    assert keygate_headers(echo) == {}, echo
