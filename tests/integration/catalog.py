"""Test keys, plugin configurations and the assertions shared by the test modules."""

from __future__ import annotations

import copy
import json

from harness import Response, key_hash

# ----------------------------------------------------------------------------- keys
# Plaintext keys; only their digests go into the configuration.

CLIENT = "kg_test_client1_9f8e7d6c5b4a3921"  # client-1: role client, tenant test-tenant
ADMIN = "kg_test_admin1_0a1b2c3d4e5f6789"  # admin-1: role admin
READER = "kg_test_reader1_55aa55aa55aa55aa"  # reader-1: role client, scope jobs:read only
MINER = "kg_test_miner1_1234123412341234"  # miner-1: role miner, scope jobs:write
SUSPENDED = "kg_test_suspended1_77777777"  # suspended-1
REVOKED = "kg_test_revoked1_666666666666"  # revoked-1
EXPIRED = "kg_test_expired1_202001010000"  # expired-1: expired in 2020
OFFSET = "kg_test_offset1_20990630_0200"  # offset-1: expires 2099, with a +02:00 offset
BARE = "kg_test_bare1_only_required_f"  # bare-1: only id, hash, role
KEY16 = "kg16_abcdefghijk"  # len16: exactly 16 characters, valid
KEY512 = "kg512_" + "x" * 506  # len512: exactly 512 characters, valid
KEY15 = "kg15_abcdefghij"  # len15: 15 characters, configured but too short
KEY513 = "kg513_" + "y" * 507  # len513: 513 characters, configured but too long
KEY_TAB = "kg_ctrl_abc\tdef_ghijklmn"  # ctrl-1: configured, but has a control character
UNKNOWN = "kg_test_unknown_4242424242424242"  # not configured
# Non-ASCII UTF-8 keys: the length limits count characters, not bytes.
KEY_U16 = "ключ-ключ-ключ-к"  # utf8-16: 16 characters (29 bytes), valid
KEY_U512 = "é" * 512  # utf8-512: 512 characters (1024 bytes), valid
KEY_U12 = "é" * 12  # utf8-12: 12 characters (24 bytes), configured but too short
KEY_U513 = "é" * 513  # utf8-513: 513 characters, configured but too long

assert len(KEY16) == 16 and len(KEY512) == 512 and len(KEY15) == 15 and len(KEY513) == 513
assert len(KEY_U16) == 16 and len(KEY_U16.encode()) > 16 and len(KEY_U12.encode()) >= 16

TENANT = "test-tenant"

KEYS = [
    {
        "id": "client-1",
        "hash": key_hash(CLIENT),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:write", "jobs:read"],
        "status": "active",
        "expires_at": "2099-01-01T00:00:00Z",
    },
    {
        "id": "admin-1",
        "hash": key_hash(ADMIN),
        "client": "ops",
        "tenant": TENANT,
        "role": "admin",
        "scopes": ["jobs:write"],
    },
    {
        "id": "reader-1",
        "hash": key_hash(READER),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:read"],
    },
    {
        "id": "miner-1",
        "hash": key_hash(MINER),
        "client": "digger",
        "tenant": TENANT,
        "role": "miner",
        "scopes": ["jobs:write"],
    },
    {
        "id": "suspended-1",
        "hash": key_hash(SUSPENDED),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:write"],
        "status": "suspended",
    },
    {
        "id": "revoked-1",
        "hash": key_hash(REVOKED),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:write"],
        "status": "revoked",
    },
    {
        "id": "expired-1",
        "hash": key_hash(EXPIRED),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:write"],
        "expires_at": "2020-01-01T00:00:00Z",
    },
    {
        "id": "offset-1",
        "hash": key_hash(OFFSET),
        "client": "acme",
        "tenant": TENANT,
        "role": "client",
        "scopes": ["jobs:write"],
        "expires_at": "2099-06-30T23:59:59+02:00",
    },
    {"id": "bare-1", "hash": key_hash(BARE), "role": "client"},
    {"id": "len16", "hash": key_hash(KEY16), "role": "client"},
    {"id": "len512", "hash": key_hash(KEY512), "role": "client"},
    {"id": "len15", "hash": key_hash(KEY15), "role": "client"},
    {"id": "len513", "hash": key_hash(KEY513), "role": "client"},
    {"id": "ctrl-1", "hash": key_hash(KEY_TAB), "role": "client"},
    {"id": "utf8-16", "hash": key_hash(KEY_U16), "role": "client"},
    {"id": "utf8-512", "hash": key_hash(KEY_U512), "role": "client"},
    {"id": "utf8-12", "hash": key_hash(KEY_U12), "role": "client"},
    {"id": "utf8-513", "hash": key_hash(KEY_U513), "role": "client"},
]

# Every plaintext above, for "never logged" checks.
ALL_PLAINTEXTS = [
    CLIENT, ADMIN, READER, MINER, SUSPENDED, REVOKED, EXPIRED, OFFSET, BARE,
    KEY16, KEY512, KEY15, KEY513, KEY_TAB, UNKNOWN, KEY_U16, KEY_U512, KEY_U12, KEY_U513,
]

ROUTES = [
    {"prefix": "/healthz", "public": True},
    {"prefix": "/v1/admin", "roles": ["admin"]},
    {"prefix": "/v1/jobs", "methods": ["POST"], "roles": ["client", "admin"], "scopes": ["jobs:write"]},
]

MAIN_CONFIG = {
    "realm": "keygate",
    "key_sources": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}],
    "keys": KEYS,
    "routes": ROUTES,
    "strip_credentials": True,
    "allow_cors_preflight": False,
}

# Custom realm, credentials forwarded, CORS preflights let through; defaults elsewhere.
ALT_REALM = "edge-api"
ALT_CONFIG = {
    "realm": ALT_REALM,
    "keys": KEYS,
    "routes": ROUTES,
    "strip_credentials": False,
    "allow_cors_preflight": True,
}


def config(**overrides) -> dict:
    """A deep copy of MAIN_CONFIG with top-level fields replaced."""
    c = copy.deepcopy(MAIN_CONFIG)
    c.update(copy.deepcopy(overrides))
    return c


# ----------------------------------------------------------------------------- outcomes

DENIALS = {
    "missing_api_key": (401, "API key required"),
    "invalid_api_key": (401, "Invalid API key"),
    "key_revoked": (401, "API key has been revoked"),
    "key_expired": (401, "API key has expired"),
    "key_suspended": (403, "API key is suspended"),
    "insufficient_permissions": (403, "API key lacks permission for this route"),
    "tenant_mismatch": (403, "API key does not belong to this tenant"),
}


def assert_denied(r: Response, code: str, realm: str = "keygate") -> None:
    """`r` is keygate's refusal `code`: status, exact JSON body, content type, and
    WWW-Authenticate on 401s only."""
    status, message = DENIALS[code]
    assert r.status == status, f"expected {status} {code}, got:\n{r}"
    assert r.header("content-type") == "application/json", f"content-type:\n{r}"
    body = r.json()
    assert body == {"error": code, "message": message}, f"body:\n{r}"
    if status == 401:
        assert r.header_values("www-authenticate") == [f'ApiKey realm="{realm}"'], f"401 challenge:\n{r}"
    else:
        assert r.header("www-authenticate") is None, f"a {status} must not carry WWW-Authenticate:\n{r}"


def assert_allowed(r: Response) -> dict:
    """`r` came from the echo upstream with 200; returns what the upstream received."""
    assert r.status == 200, f"expected 200 from the upstream, got:\n{r}"
    echo = r.json()
    assert set(echo) >= {"method", "path", "headers", "body_bytes"}, f"not an echo response:\n{r}"
    return echo


def keygate_headers(echo: dict) -> dict:
    """The x-keygate-* headers the upstream received."""
    return {n: v for n, v in echo["headers"].items() if n.startswith("x-keygate-")}


def identity(key_id: str, role: str, client: str | None = None, scopes: str | None = None) -> dict:
    out = {"x-keygate-key-id": key_id, "x-keygate-role": role}
    if client is not None:
        out["x-keygate-client"] = client
    if scopes is not None:
        out["x-keygate-scopes"] = scopes
    return out


CLIENT_IDENTITY = identity("client-1", "client", "acme", "jobs:write,jobs:read")
ADMIN_IDENTITY = identity("admin-1", "admin", "ops", "jobs:write")


def pretty(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
