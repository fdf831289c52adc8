#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/<target>/<seed>: a handful of meaningful
inputs per target. Run it again after changing it (`python3 fuzz/seeds.py`); each
target's directory then holds exactly the seeds named here. Header maps are encoded as wire::encode_pairs does: u32
count, then u32 name and value lengths per pair, then each name and value followed by a
NUL, all little-endian."""

import base64
import hashlib
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def b(s):
    return s if isinstance(s, bytes) else s.encode()


def encode_pairs(pairs):
    out = struct.pack("<I", len(pairs))
    for name, value in pairs:
        out += struct.pack("<II", len(b(name)), len(b(value)))
    for name, value in pairs:
        out += b(name) + b"\0" + b(value) + b"\0"
    return out


def sha256(key):
    return "sha256:" + hashlib.sha256(b(key)).hexdigest()


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for stale in set(os.listdir(d)) - set(seeds):
        os.remove(os.path.join(d, stale))
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(b(data))


def request(method, path, *extra):
    return [(":method", method), (":path", path), (":authority", "api.example.com"),
            (":scheme", "https"), ("user-agent", "curl/8.5.0"), *extra]


# Keys of the decide target's fixed configuration (fuzz_targets/decide.rs).
ADMIN = "fuzz-admin-key-0001"
CLIENT = "fuzz-client-key-0001"
TENANT = "fuzz-client-key-0002"
OFFICE = "fuzz-client-key-0003"
DRAINED = "fuzz-drained-key-0001"
REVOKED = "fuzz-revoked-key-0001"

write("header_map", {
    "empty": b"",
    "no-headers": encode_pairs([]),
    "get": encode_pairs(request("GET", "/v1/jobs/7", ("x-api-key", CLIENT), ("accept", "*/*"))),
    "bearer-xff": encode_pairs(request("POST", "/v1/jobs", ("authorization", "Bearer " + CLIENT),
                                       ("x-forwarded-for", "203.0.113.9, 10.1.1.1"),
                                       ("content-type", "application/json"))),
    "non-utf8-value": encode_pairs(request("GET", b"/v1/admin/users?\xff", ("x-api-key", b"k\xff\xfe"))),
    "non-utf8-name": encode_pairs([(b"\xff", b"v"), ("x-api-key", CLIENT)]),
    "truncated": encode_pairs(request("GET", "/"))[:-5],
    "huge-count": struct.pack("<I", 0xFFFFFFFF) + encode_pairs([("a", "b")])[4:],
})

write("path", {
    "root": "/",
    "plain": "/v1/jobs/7",
    "query": "/v1/jobs?page=2&sort=-created",
    "params": "/v1/admin;x=1",
    "params-query": "/v1/admin;jsessionid=abc/users?x=1",
    "dotdot-encoded": "/v1/%2e%2e/admin",
    "dotdot": "/v1/public/../admin",
    "dot": "/v1/./admin/",
    "encoded-letter": "/v1/%61dmin",
    "encoded-slash": "/v1%2Fadmin%2fusers",
    "backslash": "/v1\\admin",
    "slashes": "/v1//admin///users",
    "case": "/V1/ADMIN",
    "raw-byte-in-query": b"/v1/admin/users?\xff",
    "encoded-control": "/v1/admin%00.json",
    "bad-escape": "/v1/%zz/%4",
    "fragment": "/v1/admin#top",
    "asterisk": "*",
    "absolute": "https://api.example.com/v1/admin",
})

write("credentials", {
    "x-api-key": "x-api-key:" + CLIENT,
    "bearer": "authorization:Bearer " + CLIENT,
    "mixed-case": "X-Api-Key: k-0123456789abcdef\nAuthorization: bEaReR\tk-0123456789abcdef ",
    "joined": "authorization:Bearer k1, Bearer k1",
    "conflict": "x-api-key:k1\nauthorization:Bearer k2",
    "basic-and-key": "authorization:Basic dXNlcjpwYXNz\nx-api-key:k1\nhost:api.example.com",
    "empty-bearer": "authorization:Bearer",
    "non-utf8": b"x-api-key:k\xff\xfe\nauthorization:Bearer k\xff\xfe",
})

write("forwarded_for", {
    "direct": "198.51.100.1:443",
    "through-proxies": "127.0.0.1:5000\n198.51.100.1, 203.0.113.9, 10.1.1.1, 127.0.0.1",
    "several-headers": "127.0.0.1:5000\n198.51.100.1\n203.0.113.9, 10.1.1.1",
    "ipv6": "[::1]:5000\n[2001:db8::5]:1234, 10.0.0.1",
    "mapped": "[::ffff:127.0.0.1]:5000\n::ffff:203.0.113.9",
    "all-trusted": "127.0.0.1:5000\n10.0.0.9, 10.0.0.8",
    "from-request": "203.0.113.9:0\n10.0.0.1",
    "empty-entry": "127.0.0.1:5000\n1.2.3.4,,5.6.7.8",
    "empty-header": "127.0.0.1:5000\n\n 10.0.0.9",
    "garbage": b"127.0.0.1:5000\nunknown, \xff",
    "port": "127.0.0.1:5000\n203.0.113.9:8080",
    "cidr": "10.0.0.0/8",
})

KEYSET_KEYS = ["fuzz-set-member-%04d" % i for i in range(4)]
digests = b"".join(hashlib.sha256(k.encode()).digest()[:16] for k in KEYSET_KEYS)
full = {
    "realm": "example-api",
    "key_sources": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}],
    "keys": [
        {"id": "admin", "hash": sha256(ADMIN), "role": "admin"},
        {"id": "client", "hash": sha256(CLIENT), "client": "acme", "tenant": "t1",
         "role": "client", "scopes": ["jobs:read", "jobs:write"], "plan": "pro",
         "expires_at": "2027-01-01T00:00:00Z", "allowed_ips": ["10.0.0.0/8", "2001:db8::/32"]},
        {"id": "old", "hash": sha256(REVOKED), "role": "client", "status": "revoked"},
    ],
    "key_sets": [{"name": "batch", "digests": [base64.b64encode(digests).decode()],
                  "role": "client", "plan": "tiny"}],
    "routes": [
        {"prefix": "/healthz", "public": True},
        {"prefix": "/v1/admin", "roles": ["admin"]},
        {"prefix": "/v1/jobs", "methods": ["GET", "POST"], "scopes": ["jobs:read"]},
        {"prefix": "/"},
    ],
    "strip_credentials": True,
    "allow_cors_preflight": True,
    "plans": {"tiny": {"requests": 1, "per": "day", "burst": 2}},
    "default_plan": "free",
    "ip_rules": {"allow": ["*"], "deny": ["203.0.113.0/24"]},
    "trusted_proxies": ["127.0.0.1/32", "10.0.0.0/8"],
    "failed_auth_limit": {"requests": 10, "per": "minute"},
    "rate_limit_headers": False,
    "health_path": "/keygate/health",
    "key_format": {"prefix": "kg", "checksum": True},
}
write("config", {
    "full": json.dumps(full, indent=2),
    "minimal": json.dumps({"keys": [{"id": "k", "hash": sha256(CLIENT), "role": "client"}]}),
    "all-public": json.dumps({"routes": [{"prefix": "/", "public": True}]}),
    "bad-hash": json.dumps({"keys": [{"id": "k", "hash": "sha256:00", "role": "client"}]}),
    "bad-base64": json.dumps({"key_sets": [{"name": "s", "digests": ["AAAA"], "role": "r"}]}),
    "unknown-field": '{"keys": [], "rouets": []}',
    "empty": "",
})

LOCAL = "127.0.0.1:5000\n"
OUTSIDE = "198.51.100.7:4000\n"


def decide(peer, method, path, *extra):
    return b(peer) + encode_pairs(request(method, path, *extra))


key = lambda k: ("x-api-key", k)
write("decide", {
    "admin": decide(OUTSIDE, "GET", "/v1/admin/users", key(ADMIN)),
    "client-jobs": decide(OUTSIDE, "GET", "/v1/jobs/7?page=2", key(CLIENT)),
    "client-bearer": decide(OUTSIDE, "POST", "/v1/jobs", ("authorization", "Bearer " + CLIENT)),
    "client-admin": decide(OUTSIDE, "GET", "/v1/admin", key(CLIENT)),
    "client-admin-params": decide(OUTSIDE, "GET", "/v1/admin;x=1", key(CLIENT)),
    "client-admin-escaped": decide(OUTSIDE, "GET", "/v1/%61dmin/users", key(CLIENT)),
    "client-admin-case": decide(OUTSIDE, "DELETE", "/V1/Admin/users/7", key(CLIENT)),
    "client-admin-dots": decide(OUTSIDE, "GET", "/v1/public/../admin", key(CLIENT)),
    "client-admin-slashes": decide(OUTSIDE, "GET", "/v1//admin", key(CLIENT)),
    "client-admin-backslash": decide(OUTSIDE, "GET", "/v1\\admin", key(CLIENT)),
    "client-admin-raw-query": decide(OUTSIDE, "GET", b"/v1/admin/users?\xff", key(CLIENT)),
    "client-admin-double-escaped": decide(OUTSIDE, "GET", "/v1/%2561dmin", key(CLIENT)),
    "client-admin-escaped-slash": decide(OUTSIDE, "GET", "/v1/admin%2f..%2fjobs", key(CLIENT)),
    "client-root": decide(OUTSIDE, "GET", "/v2/anything", key(CLIENT)),
    "public": decide(OUTSIDE, "GET", "/v1/public/status"),
    "preflight": decide(OUTSIDE, "OPTIONS", "/v1/admin", ("origin", "https://app.example.com"),
                        ("access-control-request-method", "DELETE")),
    "spoofed-identity": decide(OUTSIDE, "GET", "/v1/jobs", key(CLIENT), ("X-Keygate-Role", "admin"),
                               ("x-keygate-key-id", "admin")),
    "via-proxy": decide(LOCAL, "GET", "/v1/admin", key(ADMIN), ("x-forwarded-for", "198.51.100.9, 127.0.0.1")),
    "office-via-proxy": decide(LOCAL, "GET", "/v1/reports", key(OFFICE), ("x-forwarded-for", "10.1.2.3")),
    "denied-via-proxy": decide(LOCAL, "GET", "/", key(ADMIN), ("x-forwarded-for", "203.0.113.5")),
    "denied": decide("203.0.113.5:4000\n", "GET", "/", key(ADMIN)),
    "locked": decide("198.51.100.66:4000\n", "GET", "/", key(ADMIN)),
    "from-request": decide("198.51.100.7:0\n", "GET", "/", key(ADMIN)),
    "tenant-mismatch": decide(OUTSIDE, "GET", "/", key(TENANT), ("x-tenant-id", "t2")),
    "drained": decide(OUTSIDE, "GET", "/", key(DRAINED)),
    "revoked": decide(OUTSIDE, "GET", "/", key(REVOKED)),
    "conflicting": decide(OUTSIDE, "GET", "/", key(CLIENT), ("authorization", "Bearer " + ADMIN)),
    "health": decide(OUTSIDE, "GET", "/keygate/health?probe=1"),
    "checksum-prefix": decide(OUTSIDE, "GET", "/", key("kg_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")),
})
