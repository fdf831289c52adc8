"""Key sets (packed digests) in a real Envoy: members authenticate with ids of their own,
each with its own bucket, and the identity of the set is forwarded."""

import base64
import hashlib

from catalog import assert_allowed, assert_denied

MEMBERS = [f"bulk-member-key-{i:04d}" for i in range(200)]


def packed(keys, per_string=64):
    """Base64 strings of digest prefixes (the first 16 bytes of each SHA-256 digest),
    `per_string` prefixes each."""
    digests = [hashlib.sha256(k.encode()).digest()[:16] for k in keys]
    return [base64.b64encode(b"".join(digests[i:i + per_string])).decode()
            for i in range(0, len(digests), per_string)]


def member_id(key):
    return "bulk:" + hashlib.sha256(key.encode()).hexdigest()[:16]


CONFIG = {
    "key_sets": [{
        "name": "bulk", "role": "miner", "tenant": "pool-1", "scopes": ["shares:submit"],
        "plan": "three", "digests": packed(MEMBERS),
    }],
    "plans": {"three": {"requests": 3, "per": "hour"}},
    "routes": [{"prefix": "/v1/admin", "roles": ["admin"]}],
}


def test_key_set_members_in_envoy(start_envoy, http2):
    envoy = start_envoy(CONFIG)
    first, second = MEMBERS[0], MEMBERS[137]
    echo = assert_allowed(envoy.request("GET", "/v1/shares", [("x-api-key", first)], http2=http2))
    h = echo["headers"]
    assert h["x-keygate-key-id"] == member_id(first), h
    assert (h["x-keygate-role"], h["x-tenant-id"], h["x-keygate-scopes"]) == ("miner", "pool-1", "shares:submit")
    assert "x-api-key" not in h

    # One bucket per member: the first uses up its 3, the second still has its own.
    for _ in range(2):
        assert_allowed(envoy.request("GET", "/v1/shares", [("x-api-key", first)], http2=http2))
    limited = envoy.request("GET", "/v1/shares", [("x-api-key", first)], http2=http2)
    assert limited.status == 429 and limited.json()["error"] == "rate_limited", limited
    assert int(limited.header("retry-after")) >= 1
    r = envoy.request("GET", "/v1/shares", [("authorization", f"Bearer {second}")], http2=http2)
    assert assert_allowed(r)["headers"]["x-keygate-key-id"] == member_id(second)
    assert r.header("x-ratelimit-remaining") == "2"

    assert_denied(envoy.request("GET", "/v1/admin/x", [("x-api-key", second)], http2=http2),
                  "insufficient_permissions")
    assert_denied(envoy.request("GET", "/v1/shares", [("x-api-key", "bulk-member-key-9999")], http2=http2),
                  "invalid_api_key")
    assert envoy.wait_for_log(r"keygate: configured 200 keys")
