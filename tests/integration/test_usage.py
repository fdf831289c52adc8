"""`keygate usage` against real Envoys: the tool reads the filter's per-key series from
the admin's /stats/prometheus (a policy with "per_key_metrics": true, Envoy's tag
extraction from the harness bootstrap), shows each key of the store with its requests,
denials and last use, flags the key never used, and sums the counters of two Envoys
watching one ECDS file."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import Ecds

POLICY = {
    "per_key_metrics": True,
    "default_plan": "free",
    "key_format": {"prefix": "kg", "checksum": True},
}


class Tool:
    """The `keygate` command line on a store (with POLICY) and an ECDS file of the test's own."""

    def __init__(self, cli: Path, workdir: Path, wasm: Path):
        self.cli = cli
        self.store = workdir / "keygate.json"
        self.ecds = workdir / "ecds" / "keygate.yaml"
        self.ecds.parent.mkdir()
        policy = workdir / "policy.json"
        policy.write_text(json.dumps(POLICY))
        self.ok("init", "--ecds", str(self.ecds), "--wasm", str(wasm), "--policy", str(policy))

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.cli), "--store", str(self.store), *args],
            capture_output=True, text=True, timeout=60,
        )

    def ok(self, *args: str) -> str:
        proc = self.run(*args)
        assert proc.returncode == 0, f"keygate {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
        return proc.stdout

    def json(self, *args: str):
        return json.loads(self.ok("--json", *args))

    def create(self, name: str, *args: str) -> tuple[str, str]:
        out = self.json("create", "--name", name, "--role", "client", *args)
        return out["id"], out["key"]


@pytest.fixture
def tool(paths, tmp_path) -> Tool:
    return Tool(paths.cli, tmp_path, paths.wasm)


def admin_url(envoy) -> str:
    return f"http://127.0.0.1:{envoy.admin_port}"


def get(envoy, key: str, *headers: tuple[str, str]) -> int:
    return envoy.request("GET", "/v1/jobs", [("x-api-key", key), *headers]).status


def usage_when(tool: Tool, admins: list[str], done, within: float = 5.0) -> dict:
    """`keygate --json usage` for `admins`, polled until `done(out)` (the filter adds its
    counts to Envoy's every 250 ms)."""
    args = [a for url in admins for a in ("--envoy-admin", url)]
    deadline = time.monotonic() + within
    while True:
        out = tool.json("usage", *args)
        if done(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def by_id(out: dict) -> dict[str, dict]:
    return {k["id"]: k for k in out["keys"]}


def test_usage_of_one_envoy_counts_each_key_and_flags_the_unused(start_envoy, tool):
    busy, busy_key = tool.create("acme-prod", "--tenant", "acme")
    quiet, quiet_key = tool.create("acme-staging", "--tenant", "acme")
    idle, idle_key = tool.create("old-batch")
    tool.ok("apply")
    envoy = start_envoy(Ecds(tool.ecds))
    started = int(time.time())

    for _ in range(3):
        assert get(envoy, busy_key) == 200
    assert get(envoy, quiet_key) == 200
    # Refused after authentication: counted for the key, as a denial with its reason.
    assert get(envoy, quiet_key, ("x-tenant-id", "other")) == 403
    # An unknown key is nobody's: no per-key series, only the totals.
    assert get(envoy, "kg_not_a_key_of_this_store_0000000000") == 401

    out = usage_when(
        tool, [admin_url(envoy)],
        lambda o: by_id(o)[busy]["allowed"] == 3 and by_id(o)[quiet]["denied"] == 1,
    )
    now = int(time.time())
    keys = by_id(out)
    assert [k["id"] for k in out["keys"]] == [busy, quiet, idle]
    assert (keys[busy]["allowed"], keys[busy]["denied"], keys[busy]["denials"]) == (3, 0, {})
    assert (keys[quiet]["allowed"], keys[quiet]["denied"]) == (1, 1)
    assert keys[quiet]["denials"] == {"tenant_mismatch": 1}
    for key in (keys[busy], keys[quiet]):
        assert started - 1 <= key["last_used_unix"] <= now, (key, started, now)
        assert key["flag"] is None
        assert key["name"] in ("acme-prod", "acme-staging")
    assert keys[idle]["last_used"] is None and keys[idle]["allowed"] == 0
    assert keys[idle]["flag"] == "never_used"
    assert out["never_used"] == [idle]
    assert out["removed"] == []
    assert out["per_key_series"] is True
    assert out["totals"]["allowed"] == 4
    assert out["totals"]["denials"] == {"tenant_mismatch": 1, "invalid_api_key": 1}
    [one] = out["envoys"]
    assert one["admin"] == admin_url(envoy) and one["reachable"] and one["keygate_metrics"]
    assert one["uptime_seconds"] is not None

    # The table: one row per key, the unused one flagged and listed.
    text = tool.ok("usage", "--envoy-admin", admin_url(envoy), "--unused-for", "30d")
    print(text)
    lines = text.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "STATUS", "LAST", "USED", "AT", "ALLOWED", "DENIED", "DENIALS", "FLAG"
    ]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert rows[busy].split()[1:3] == ["acme-prod", "active"]
    assert rows[quiet].split()[-1] == "tenant_mismatch=1"
    assert rows[idle].split()[-2:] == ["never", "used"]
    assert "never used since Envoy started " in text
    assert f"counters of Envoy {admin_url(envoy)} (up " in text
    assert "3 keys: 2 used, 1 never used, 0 not used for 30d" in text
    for plaintext in (busy_key, quiet_key, idle_key):
        assert plaintext not in text and plaintext[:8] not in text

    # A key removed from the store stays in Envoy's counters until it restarts.
    doc = json.loads(tool.store.read_text())
    doc["keys"] = [k for k in doc["keys"] if k["id"] != quiet]
    tool.store.write_text(json.dumps(doc, indent=2))
    out = tool.json("usage", "--envoy-admin", admin_url(envoy))
    assert [k["id"] for k in out["removed"]] == [quiet]
    assert out["removed"][0]["denials"] == {"tenant_mismatch": 1}

    # With the store naming the admin, list shows the last use.
    tool.ok("set-admin", admin_url(envoy))
    listed = {k["id"]: k for k in tool.json("list")}
    assert listed[busy]["last_used"] is not None and listed[idle]["last_used"] is None
    text = tool.ok("list")
    print(text)
    assert text.splitlines()[0].split()[-2:] == ["LAST", "USED"]


def test_usage_of_two_envoys_is_summed(start_envoy, tool):
    shared, shared_key = tool.create("acme-prod")
    one_side, one_side_key = tool.create("acme-staging")
    idle, _ = tool.create("old-batch")
    tool.ok("apply")
    a = start_envoy(Ecds(tool.ecds))
    b = start_envoy(Ecds(tool.ecds))

    for _ in range(2):
        assert get(a, shared_key) == 200
    for _ in range(3):
        assert get(b, shared_key) == 200
    assert get(b, one_side_key) == 200
    assert get(b, one_side_key) == 200

    admins = [admin_url(a), admin_url(b)]
    out = usage_when(
        tool, admins,
        lambda o: by_id(o)[shared]["allowed"] == 5 and by_id(o)[one_side]["allowed"] == 2,
    )
    keys = by_id(out)
    assert keys[shared]["allowed"] == 5
    assert keys[one_side]["allowed"] == 2
    assert keys[idle]["flag"] == "never_used"
    assert out["totals"]["allowed"] == 7
    assert [e["admin"] for e in out["envoys"]] == admins
    # Last use is the latest of the two Envoys': each one's own gauge is no later.
    alone_a = by_id(tool.json("usage", "--envoy-admin", admin_url(a)))[shared]
    alone_b = by_id(tool.json("usage", "--envoy-admin", admin_url(b)))[shared]
    assert (alone_a["allowed"], alone_b["allowed"]) == (2, 3)
    assert keys[shared]["last_used_unix"] == max(alone_a["last_used_unix"], alone_b["last_used_unix"])
    assert by_id(tool.json("usage", "--envoy-admin", admin_url(a)))[one_side]["flag"] == "never_used"

    # The store names both, and a third that is down: reported, the others still used.
    b.stop()
    tool.ok("set-admin", admin_url(a), admin_url(b))
    proc = tool.run("usage")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"keygate: warning: Envoy admin {admin_url(b)} did not answer"), proc.stderr
    print(proc.stdout)
    assert f"counters of Envoy {admin_url(a)}" in proc.stdout
    out = json.loads(tool.run("--json", "usage").stdout)
    assert by_id(out)[shared]["allowed"] == 2
    assert out["envoys"][1]["reachable"] is False
    # None answers: exit 1.
    a.stop()
    proc = tool.run("usage")
    assert proc.returncode == 1 and proc.stderr.startswith("keygate: no usage: no Envoy admin answered"), proc
