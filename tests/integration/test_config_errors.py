"""Envoy refuses to start when the plugin configuration is invalid, naming the field."""

import re

import pytest

from catalog import config
from harness import key_hash

PREFIX = "keygate: invalid configuration: "
GOOD_HASH = key_hash("kg_test_config_errors_0000000")


def key(**fields):
    base = {"id": "k-1", "hash": GOOD_HASH, "role": "client"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def with_keys(*keys):
    return config(keys=list(keys))


CASES = {
    # name: (plugin configuration, regex the text after PREFIX must match)
    "hash-uppercase": (with_keys(key(hash=GOOD_HASH.upper().replace("SHA256", "sha256"))), r"^keys\[0\]\.hash:"),
    "hash-no-prefix": (with_keys(key(hash=GOOD_HASH[len("sha256:"):])), r"^keys\[0\]\.hash:"),
    "hash-short": (with_keys(key(hash=GOOD_HASH[:-1])), r"^keys\[0\]\.hash:"),
    "hash-sha1": (with_keys(key(hash="sha1:" + "a" * 40)), r"^keys\[0\]\.hash:"),
    "hash-second-key": (with_keys(key(), key(id="k-2", hash="sha256:xyz")), r"^keys\[1\]\.hash:"),
    "duplicate-id": (with_keys(key(), key(hash=key_hash("kg_test_another_key_00000000"))), r"^keys\[1\]\.id:"),
    "duplicate-hash": (with_keys(key(), key(id="k-2")), r"^keys\[1\]\.hash:"),
    "unknown-status": (with_keys(key(status="disabled")), r"^keys\[0\]\.status:"),
    "bad-timestamp": (with_keys(key(expires_at="2027-13-01T00:00:00Z")), r"^keys\[0\]\.expires_at:"),
    "timestamp-not-rfc3339": (with_keys(key(expires_at="next tuesday")), r"^keys\[0\]\.expires_at:"),
    "second-key-timestamp": (with_keys(key(), key(id="k-2", hash=key_hash("kg_test_another_key_00000000"), expires_at="2027-01-01")), r"^keys\[1\]\.expires_at:"),
    "unknown-key-field": (with_keys(key(colour="blue")), r"^keys\[0\].*colour"),
    "missing-role": (with_keys(key(role=None)), r"^keys\[0\].*role"),
    "unknown-top-level-field": (config(realmm="x"), r"realmm"),
    "unknown-route-field": (config(routes=[{"prefix": "/v1", "rolez": ["admin"]}]), r"^routes\[0\].*rolez"),
    "not-json": ('{"keys": [', r"."),
    "wrong-type": (config(strip_credentials="yes"), r"^strip_credentials:"),
    # From the configuration reference (docs/configuration.md).
    "no-keys": (config(keys=[]), r"^keys"),
    "bad-id": (with_keys(key(id="has space")), r"^keys\[0\]\.id:"),
    "scope-with-comma": (with_keys(key(scopes=["jobs:read,jobs:write"])), r"^keys\[0\]\.scopes"),
    "realm-with-quote": (config(realm='a"b'), r"^realm:"),
    "route-without-slash": (config(routes=[{"prefix": "v1"}]), r"^routes\[0\]\.prefix:"),
    "route-shadowed": (config(routes=[{"prefix": "/v1"}, {"prefix": "/v1/admin", "roles": ["admin"]}]), r"^routes\[1\]"),
    "public-with-roles": (config(routes=[{"prefix": "/h", "public": True, "roles": ["admin"]}]), r"^routes\[0\]"),
    "unknown-plan": (with_keys(key(plan="platinum")), r"^keys\[0\]\.plan:"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_invalid_configuration_stops_envoy(start_envoy, name):
    plugin_config, expected = CASES[name]
    envoy = start_envoy.expecting_failure(plugin_config)
    status = envoy.wait_exit(timeout=15)
    log = envoy.log()
    assert status != 0, f"Envoy exited with 0 on an invalid configuration; log:\n{envoy.log_tail()}"
    lines = [line for line in log.splitlines() if PREFIX in line]
    assert lines, f"no line with {PREFIX!r} in the Envoy log:\n{envoy.log_tail()}"
    details = [line.split(PREFIX, 1)[1] for line in lines]
    assert any(re.search(expected, d) for d in details), (
        f"expected the error to match {expected!r}; got:\n" + "\n".join(lines)
    )


def test_valid_configuration_starts(start_envoy):
    # The control for the cases above: the same base configuration is accepted.
    envoy = start_envoy(with_keys(key()))
    assert envoy.alive()
    assert PREFIX not in envoy.log(), envoy.log_tail()
