"""Hot reload: the `keygate` tool changes the key set and Envoy picks it up through ECDS,
without a restart, without losing rate-limit state, and without a bad push taking the
edge down."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from harness import Ecds


class Tool:
    """The `keygate` command line, on a store and ECDS file of the test's own."""

    def __init__(self, cli: Path, workdir: Path, wasm: Path):
        self.cli = cli
        self.store = workdir / "keygate.json"
        self.ecds = workdir / "ecds" / "keygate.yaml"
        self.ecds.parent.mkdir()
        self.run("init", "--ecds", str(self.ecds), "--wasm", str(wasm))

    def run(self, *args: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            [str(self.cli), "--store", str(self.store), *args],
            input=stdin, capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 0, f"keygate {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
        return proc.stdout

    def json(self, *args: str, stdin: str | None = None):
        return json.loads(self.run("--json", *args, stdin=stdin))

    def create(self, *args: str) -> tuple[str, str]:
        out = self.json("create", "--name", "test", "--role", "client", *args)
        return out["id"], out["key"]


@pytest.fixture
def tool(paths, tmp_path) -> Tool:
    return Tool(paths.cli, tmp_path, paths.wasm)


def get(envoy, key: str):
    return envoy.request("GET", "/v1/work", [("x-api-key", key)])


def wait_for_status(envoy, key: str, status: int, within: float) -> float:
    """Polls until `key` gets `status`; returns the seconds it took (fails after `within`)."""
    start = time.monotonic()
    while True:
        r = get(envoy, key)
        elapsed = time.monotonic() - start
        if r.status == status:
            return elapsed
        assert elapsed < within, f"still {r.status} after {elapsed:.1f}s, wanted {status}: {r}"
        time.sleep(0.05)


def updates(envoy) -> tuple[int, int]:
    stats = envoy.admin_get("/stats?filter=extension_config_discovery.http_filter.keygate")
    values = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    prefix = "extension_config_discovery.http_filter.keygate."
    return int(values[prefix + "update_success"]), int(values[prefix + "update_rejected"])


def test_create_revoke_and_rotate_without_restart(start_envoy, tool):
    first_id, first = tool.create("--apply")
    envoy = start_envoy(Ecds(tool.ecds))
    pid = envoy.proc.pid
    assert get(envoy, first).status == 200

    # A key created while Envoy runs works within 2 s.
    second_id, second = tool.create("--apply")
    took = wait_for_status(envoy, second, 200, within=2.0)
    print(f"new key accepted {took:.2f}s after apply")

    # Revoked: 401 key_revoked within 2 s.
    tool.run("revoke", second_id, "--apply")
    took = wait_for_status(envoy, second, 401, within=2.0)
    print(f"revoked key refused {took:.2f}s after apply")
    assert get(envoy, second).json()["error"] == "key_revoked"

    # Rotation with a grace period: both keys work, then only the new one.
    rotated = tool.json("rotate", first_id, "--grace", "4s", "--apply")
    new = rotated["key"]
    wait_for_status(envoy, new, 200, within=2.0)
    assert get(envoy, first).status == 200
    deadline = time.monotonic() + 8
    while get(envoy, first).status == 200:
        assert time.monotonic() < deadline, "the old key still works long after its grace period"
        time.sleep(0.2)
    r = get(envoy, first)
    assert r.status == 401 and r.json()["error"] == "key_expired", r
    assert get(envoy, new).status == 200

    # Never restarted.
    assert envoy.proc.pid == pid and envoy.alive()
    success, rejected = updates(envoy)
    assert success >= 4 and rejected == 0, (success, rejected)


def test_bucket_state_survives_reload(start_envoy, tool):
    # 10 requests an hour: nothing refills during the test.
    policy = json.loads(tool.store.read_text())
    policy["policy"].setdefault("plans", {})["hourly10"] = {"requests": 10, "per": "hour"}
    tool.store.write_text(json.dumps(policy))
    key_id, key = tool.create("--plan", "hourly10", "--apply")
    envoy = start_envoy(Ecds(tool.ecds))
    for left in range(9, 4, -1):
        r = get(envoy, key)
        assert r.status == 200 and r.header("x-ratelimit-remaining") == str(left), r
    # Reload (another key added), then the bucket carries on where it was.
    _, other = tool.create("--apply")
    wait_for_status(envoy, other, 200, within=2.0)
    r = get(envoy, key)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "4", r


def test_invalid_push_is_rejected_and_old_keys_keep_working(start_envoy, tool):
    key_id, key = tool.create("--apply")
    envoy = start_envoy(Ecds(tool.ecds))
    assert get(envoy, key).status == 200
    success_before, rejected_before = updates(envoy)

    # A hand-edited file the filter refuses (bad hash), moved into place as tools do.
    doc = json.loads(tool.ecds.read_text())
    config = doc["resources"][0]["typed_config"]["config"]["configuration"]
    plugin = json.loads(config["value"])
    plugin["keys"][0]["hash"] = "sha256:not-a-hash"
    config["value"] = json.dumps(plugin)
    tmp = tool.ecds.with_name("edit.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, tool.ecds)

    deadline = time.monotonic() + 5
    while updates(envoy)[1] == rejected_before:
        assert time.monotonic() < deadline, "Envoy did not reject the invalid push"
        time.sleep(0.05)
    assert envoy.wait_for_log(r"keygate: invalid configuration: keys\[0\]\.hash:")
    # The previous key set keeps serving.
    for _ in range(5):
        assert get(envoy, key).status == 200

    # A later valid push is accepted (a failed configure must not poison later pushes).
    _, fresh = tool.create("--apply")
    wait_for_status(envoy, fresh, 200, within=3.0)
    assert get(envoy, key).status == 200
    success_after, _ = updates(envoy)
    assert success_after > success_before


def test_reload_does_not_drop_open_connections(start_envoy, tool):
    _, key = tool.create("--apply")
    envoy = start_envoy(Ecds(tool.ecds))
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        conn.request("GET", "/v1/work", headers={"X-Api-Key": key})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        _, other = tool.create("--apply")
        wait_for_status(envoy, other, 200, within=2.0)
        # Same connection, after the reload.
        for k in (key, other):
            conn.request("GET", "/v1/work", headers={"X-Api-Key": k})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
    finally:
        conn.close()
    assert "downstream_cx_destroy_remote_active_rq: 0" in envoy.admin_get("/stats?filter=http.edge.downstream_cx_destroy_remote_active_rq")
