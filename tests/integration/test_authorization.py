"""403s: suspended keys, route rules (methods, roles, scopes), tenants; path normalisation."""

import pytest

from catalog import (
    ADMIN, BARE, CLIENT, MAIN_CONFIG, MINER, OFFSET, READER, SUSPENDED, TENANT,
    assert_allowed, assert_denied, keygate_headers,
)


@pytest.fixture(scope="module")
def envoy(module_envoy_starter):
    return module_envoy_starter(MAIN_CONFIG)


def key(k):
    return [("x-api-key", k)]


# ----------------------------------------------------------------------------- suspended


@pytest.mark.parametrize("path", ["/other", "/v1/jobs", "/v1/admin"])
def test_suspended_key_is_403(envoy, http2, path):
    assert_denied(envoy.request("POST", path, key(SUSPENDED), http2=http2), "key_suspended")


# ----------------------------------------------------------------------------- routes


@pytest.mark.parametrize(
    "method,path,k,key_id",
    [
        ("POST", "/v1/jobs", CLIENT, "client-1"),
        ("POST", "/v1/jobs/42/cancel", CLIENT, "client-1"),
        ("POST", "/v1/jobs?dry_run=1", CLIENT, "client-1"),
        ("POST", "/v1/jobs", ADMIN, "admin-1"),
        ("POST", "/v1/jobs", OFFSET, "offset-1"),
        ("GET", "/v1/admin", ADMIN, "admin-1"),
        ("DELETE", "/v1/admin/users/7", ADMIN, "admin-1"),
        ("GET", "/v1/other", MINER, "miner-1"),  # no matching route: any valid key
        ("DELETE", "/v2/jobs", READER, "reader-1"),
        ("GET", "/v1", BARE, "bare-1"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 and not v.startswith("kg_") else "",
)
def test_permitted_requests_are_allowed(envoy, http2, method, path, k, key_id):
    echo = assert_allowed(envoy.request(method, path, key(k), http2=http2))
    assert echo["method"] == method and echo["path"] == path, echo
    assert keygate_headers(echo)["x-keygate-key-id"] == key_id, echo


@pytest.mark.parametrize(
    "method,path,k",
    [
        ("GET", "/v1/admin", CLIENT),  # role
        ("POST", "/v1/admin/users", CLIENT),  # role, deeper path
        ("GET", "/v1/admin?as=admin", CLIENT),  # the query string changes nothing
        ("GET", "/v1/jobs", CLIENT),  # method
        ("DELETE", "/v1/jobs/1", ADMIN),  # method, even for admin
        ("POST", "/v1/jobs", READER),  # scope: reader has jobs:read only
        ("POST", "/v1/jobs", MINER),  # role: miner is not client/admin
        ("POST", "/v1/jobs", BARE),  # no scopes at all
        ("GET", "/v1/admin", MINER),
    ],
    ids=["role", "role-deeper", "role-query", "method", "method-admin", "scope", "role-miner",
         "no-scopes", "role-miner-admin"],
)
def test_route_rules_refuse_with_403(envoy, http2, method, path, k):
    assert_denied(envoy.request(method, path, key(k), http2=http2), "insufficient_permissions")


def test_permission_check_uses_the_bearer_key_too(envoy, http2):
    r = envoy.request("GET", "/v1/admin", [("authorization", f"Bearer {CLIENT}")], http2=http2)
    assert_denied(r, "insufficient_permissions")
    echo = assert_allowed(
        envoy.request("GET", "/v1/admin", [("authorization", f"Bearer {ADMIN}")], http2=http2)
    )
    assert keygate_headers(echo)["x-keygate-key-id"] == "admin-1"


@pytest.mark.parametrize(
    "path",
    ["/v1//admin", "/v1/./admin", "/v1/jobs/../admin", "//v1/admin/", "/v1/%61dmin"],
)
def test_route_rules_see_the_normalised_path(envoy, http2, path):
    # Envoy normalises before keygate matches prefixes: none of these bypass /v1/admin.
    assert_denied(envoy.request("GET", path, key(CLIENT), http2=http2), "insufficient_permissions")


def test_prefixes_match_whole_path_segments(envoy, http2):
    # /healthz is public, /healthz-internal is not; /v1/adminx is not the admin route.
    assert_denied(envoy.request("GET", "/healthz-internal", [], http2=http2), "missing_api_key")
    assert_allowed(envoy.request("GET", "/healthz/ready", [], http2=http2))
    assert_allowed(envoy.request("GET", "/v1/adminx", key(CLIENT), http2=http2))
    assert_denied(envoy.request("GET", "/v1/admin/x", key(CLIENT), http2=http2), "insufficient_permissions")


def test_escaped_slash_is_redirected_before_the_filter(envoy, http2):
    r = envoy.request("GET", "/v1%2Fadmin", key(CLIENT), http2=http2)
    # UNESCAPE_AND_REDIRECT: never reaches the upstream as a path that escaped the rule.
    assert r.status in (301, 302, 307, 308, 403), r
    if r.status != 403:
        assert r.header("location") == "/v1/admin", r


# ----------------------------------------------------------------------------- tenants


@pytest.mark.parametrize("tenant", ["other-tenant", "TEST-TENANT", "test-tenant-2"])
def test_tenant_mismatch_is_403(envoy, http2, tenant):
    r = envoy.request("GET", "/other", key(CLIENT) + [("x-tenant-id", tenant)], http2=http2)
    assert_denied(r, "tenant_mismatch")


def test_tenant_mismatch_on_a_permitted_route(envoy, http2):
    r = envoy.request("POST", "/v1/jobs", key(CLIENT) + [("X-Tenant-ID", "other-tenant")], http2=http2)
    assert_denied(r, "tenant_mismatch")


def test_tenant_mismatch_on_a_public_route_with_a_key(envoy, http2):
    r = envoy.request("GET", "/healthz", key(CLIENT) + [("X-Tenant-ID", "other-tenant")], http2=http2)
    assert_denied(r, "tenant_mismatch")


def test_matching_tenant_is_allowed(envoy, http2):
    echo = assert_allowed(
        envoy.request("POST", "/v1/jobs", key(CLIENT) + [("X-Tenant-ID", TENANT)], http2=http2)
    )
    assert echo["headers"].get("x-tenant-id") == TENANT, echo
    assert keygate_headers(echo)["x-keygate-key-id"] == "client-1", echo


def test_a_second_foreign_tenant_header_never_reaches_the_upstream(envoy, http2):
    # Either refused, or forwarded with the key's tenant only: never "other-tenant".
    for tenants in ([TENANT, "other-tenant"], ["other-tenant", TENANT]):
        headers = key(CLIENT) + [("x-tenant-id", t) for t in tenants]
        r = envoy.request("GET", "/other", headers, http2=http2)
        if r.status == 403:
            assert_denied(r, "tenant_mismatch")
        else:
            echo = assert_allowed(r)
            assert echo["headers"].get("x-tenant-id") == TENANT, echo
            assert keygate_headers(echo)["x-keygate-key-id"] == "client-1", echo
