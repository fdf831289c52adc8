"""The `keygate` tool against a real Envoy (--concurrency 2): a key changed in place with
`keygate update --apply` takes effect at once without a restart, a rotated key's
successor spends what is left of its predecessor's rate-limit budget, and the audit log
records each change (with whether Envoy confirmed the apply) and never a key."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import Ecds

POLICY = {
    "routes": [
        {"prefix": "/v1/jobs", "roles": ["client"], "scopes": ["jobs:write"]},
        {"prefix": "/v1", "roles": ["client"]},
    ],
    # 10 requests an hour: nothing refills during a test.
    "plans": {"hourly10": {"requests": 10, "per": "hour"}},
    "default_plan": "free",
    "key_format": {"prefix": "kg", "checksum": True},
}


class Tool:
    """The `keygate` command line on a store and ECDS file of the test's own."""

    def __init__(self, cli: Path, workdir: Path, wasm: Path):
        self.cli = cli
        self.store = workdir / "keygate.json"
        self.audit = workdir / "keygate.json.audit.jsonl"
        self.ecds = workdir / "ecds" / "keygate.yaml"
        self.ecds.parent.mkdir()
        self.ok("init", "--ecds", str(self.ecds), "--wasm", str(wasm))
        policy = workdir / "policy.json"
        policy.write_text(json.dumps(POLICY))
        self.ok("policy", "set", str(policy))
        self.keys: list[str] = []

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.cli), "--store", str(self.store), "--actor", "ci", *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        proc = self.run(*args, stdin=stdin)
        assert proc.returncode == 0, f"keygate {' '.join(args)} failed ({proc.returncode}): {proc.stderr}"
        return proc.stdout

    def json(self, *args: str, stdin: str | None = None):
        return json.loads(self.ok("--json", *args, stdin=stdin))

    def create(self, *args: str) -> tuple[str, str]:
        out = self.json("create", "--name", "test", "--role", "client", *args)
        self.keys.append(out["key"])
        return out["id"], out["key"]

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]


@pytest.fixture
def tool(paths, tmp_path) -> Tool:
    return Tool(paths.cli, tmp_path, paths.wasm)


def admin_url(envoy) -> str:
    return f"http://127.0.0.1:{envoy.admin_port}"


def get(envoy, key: str, path: str = "/v1/jobs/1"):
    return envoy.request("GET", path, [("x-api-key", key)])


def updates(envoy) -> tuple[int, int]:
    stats = envoy.admin_get("/stats?filter=extension_config_discovery.http_filter.keygate")
    values = dict(line.split(": ", 1) for line in stats.splitlines() if ": " in line)
    prefix = "extension_config_discovery.http_filter.keygate."
    return int(values[prefix + "update_success"]), int(values[prefix + "update_rejected"])


def test_an_updated_scope_takes_effect_at_apply_without_a_restart(start_envoy, tool):
    key_id, key = tool.create("--apply")  # before Envoy: it needs the file to start
    envoy = start_envoy(Ecds(tool.ecds), concurrency=2)
    pid = envoy.proc.pid
    tool.ok("set-admin", admin_url(envoy))
    # Without the scope: refused on the route that requires it, on either worker.
    for _ in range(6):
        r = get(envoy, key)
        assert r.status == 403 and r.json()["error"] == "insufficient_permissions", r
    assert get(envoy, key, "/v1/other").status == 200

    # The tool says what the filter will answer, offline, from the same code.
    proc = tool.run("--json", "verify", "--method", "GET", "--path", "/v1/jobs/1", stdin=key)
    verdict = json.loads(proc.stdout)
    assert proc.returncode == 1, proc
    assert verdict["request"]["status"] == 403 and verdict["request"]["requirement"] == "scope"

    out = tool.json("update", key_id, "--add-scope", "jobs:write", "--apply")
    assert out["envoy"]["status"] == "confirmed", out
    assert out["changes"]["scopes"] == {"old": [], "new": ["jobs:write"]}
    # Confirmed means served: the very next requests are allowed, on either worker, and
    # carry the new scope upstream.
    for _ in range(6):
        r = get(envoy, key)
        assert r.status == 200, r
        assert r.json()["headers"]["x-keygate-scopes"] == "jobs:write", r
    verdict = tool.json("verify", "--method", "GET", "--path", "/v1/jobs/1", stdin=key)
    assert verdict["request"]["status"] == 200
    assert verdict["request"]["headers"]["x-keygate-scopes"] == "jobs:write"

    # And back: removed, refused again at once.
    tool.json("update", key_id, "--remove-scope", "jobs:write", "--apply")
    assert [get(envoy, key).status for _ in range(6)] == [403] * 6

    # status: Envoy serves the store's revision.
    status = tool.json("status")
    revision = json.loads(tool.store.read_text())["revision"]
    assert status["in_sync"] and status["revision"] == revision, status
    assert status["envoys"][0]["revisions"] == [revision], status

    # A change that leaves the configuration as it was (a name) is applied and confirmed.
    out = tool.json("update", key_id, "--name", "renamed", "--apply")
    assert out["envoy"]["status"] == "confirmed", out
    assert tool.json("status")["in_sync"]
    # Envoy takes the new version text up too (same content): status shows the revision.
    deadline = time.monotonic() + 5
    while tool.json("status")["envoys"][0]["revisions"] != [out["revision"]]:
        assert time.monotonic() < deadline, tool.json("status")
        time.sleep(0.1)

    assert envoy.proc.pid == pid and envoy.alive()
    success, rejected = updates(envoy)
    assert success >= 3 and rejected == 0, (success, rejected)

    # The audit log: each change and each apply, confirmed, with the actor; no key.
    lines = tool.audit_lines()
    updates_logged = [l for l in lines if l["action"] == "update" and l.get("key") == key_id]
    assert [sorted(l["changes"]) for l in updates_logged] == [["scopes"], ["scopes"], ["name"]]
    # The create before Envoy named no admin: written, not confirmed.
    first = next(l for l in lines if l.get("apply"))
    assert first["action"] == "create" and not first["apply"]["confirmed"], first
    applies = [l for l in lines if l.get("apply") and l["action"] == "update"]
    assert len(applies) == 3 and all(l["apply"]["confirmed"] for l in applies), applies
    assert all(l["apply"]["envoys"] == {admin_url(envoy): "confirmed"} for l in applies)
    assert all(l["actor"] == "ci" for l in lines)
    text = tool.audit.read_text()
    for k in tool.keys:
        assert k not in text and k[:12] not in text


def test_a_rotated_keys_successor_shares_the_budget(start_envoy, tool):
    key_id, key = tool.create("--plan", "hourly10", "--scope", "jobs:write", "--apply")
    _, other = tool.create("--plan", "hourly10", "--scope", "jobs:write", "--apply")
    envoy = start_envoy(Ecds(tool.ecds), concurrency=2)
    tool.ok("set-admin", admin_url(envoy))
    # Spend 4 of 10.
    for left in range(9, 5, -1):
        r = get(envoy, key)
        assert r.status == 200 and r.header("x-ratelimit-remaining") == str(left), r

    out = tool.json("rotate", key_id, "--grace", "1h", "--apply")
    assert out["envoy"]["status"] == "confirmed", out
    new = out["key"]
    tool.keys.append(new)
    plugin = json.loads(tool.ok("render"))
    shares = {k["id"]: k.get("shares_quota_with") for k in plugin["keys"]}
    assert shares[out["id"]] == key_id, shares

    # The successor gets what is left (5), not a fresh 10; the old key spends the same.
    r = get(envoy, new)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "5", r
    r = get(envoy, key)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "4", r
    for left in range(3, -1, -1):
        r = get(envoy, new)
        assert r.status == 200 and r.header("x-ratelimit-remaining") == str(left), r
    # Spent: both refused; another client's key is untouched.
    assert get(envoy, new).status == 429
    assert get(envoy, key).status == 429
    r = get(envoy, other)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "9", r

    # Rotating the old key again is refused while its grace period runs.
    proc = tool.run("rotate", key_id, "--grace", "1h", "--apply")
    assert proc.returncode == 1 and "was already rotated" in proc.stderr, proc.stderr
    rotations = [l for l in tool.audit_lines() if l["action"] == "rotate" and "apply" not in l]
    assert {l["key"] for l in rotations} == {key_id, out["id"]}
    text = tool.audit.read_text()
    for k in tool.keys:
        assert k not in text
