"""`--apply` confirmed against a real Envoy: with the store naming Envoy's admin, the tool
reports a change only once Envoy serves it, and when Envoy rejects it (a broken module,
a missing one) the tool says so, exits non-zero and changes nothing, so the store, the
ECDS file and what Envoy serves stay consistent. An Envoy that is not running leaves the
change written and says so."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import Ecds


class Tool:
    """The `keygate` command line on a store and ECDS file of the test's own."""

    def __init__(self, cli: Path, workdir: Path, wasm: Path):
        self.cli = cli
        self.workdir = workdir
        self.store = workdir / "keygate.json"
        self.ecds = workdir / "ecds" / "keygate.yaml"
        self.ecds.parent.mkdir()
        self.ok("init", "--ecds", str(self.ecds), "--wasm", str(wasm))

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.cli), "--store", str(self.store), *args],
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
        return out["id"], out["key"]

    def set_wasm(self, path: Path) -> None:
        doc = json.loads(self.store.read_text())
        doc["envoy"]["wasm"] = str(path)
        self.store.write_text(json.dumps(doc, indent=2) + "\n")

    def ecds_version(self) -> str:
        return json.loads(self.ecds.read_text())["version_info"]


@pytest.fixture
def tool(paths, tmp_path) -> Tool:
    return Tool(paths.cli, tmp_path, paths.wasm)


def admin_url(envoy) -> str:
    return f"http://127.0.0.1:{envoy.admin_port}"


def status(envoy, key: str) -> int:
    return envoy.request("GET", "/v1/work", [("x-api-key", key)]).status


def served_version(envoy) -> str:
    text = envoy.admin_get("/stats?filter=extension_config_discovery.http_filter.keygate.version_text")
    return text.split(": ", 1)[1].strip().strip('"')


def rejected(envoy) -> int:
    return envoy.stat("extension_config_discovery.http_filter.keygate.update_rejected")


@pytest.fixture
def running(start_envoy, tool):
    """Envoy serving the store's first key, with the store naming its admin."""
    first_id, first = tool.create("--apply")  # before Envoy: it needs the file to start
    envoy = start_envoy(Ecds(tool.ecds), concurrency=2)
    out = tool.ok("set-admin", admin_url(envoy))
    assert "Envoy answers there and serves version sha256:" in out, out
    assert status(envoy, first) == 200
    return envoy, first_id, first


def test_create_apply_is_confirmed_and_the_key_then_works(running, tool):
    envoy, _, _ = running
    out = tool.ok("create", "--name", "second", "--role", "client", "--apply")
    key = out.splitlines()[2]
    version = tool.ecds_version()
    last = out.splitlines()[-1]
    assert last.startswith(
        f"applied: Envoy at {admin_url(envoy)} serves version {version} from {tool.ecds} (confirmed after "
    ), out
    assert served_version(envoy) == version
    # Confirmed means served: the very next request is accepted, on either worker.
    assert [status(envoy, key) for _ in range(6)] == [200] * 6

    # Revoked: refused as soon as the command returns.
    key_id = tool.json("verify", stdin=key)["id"]
    done = tool.json("revoke", key_id, "--apply")
    assert done["envoy"]["status"] == "confirmed" and done["envoy"]["seconds"] < 5, done
    assert [status(envoy, key) for _ in range(6)] == [401] * 6
    assert rejected(envoy) == 0


def _corrupt_module(workdir: Path) -> Path:
    # Passes keygate's header check (\0asm, version 1); V8 refuses the rest.
    path = workdir / "corrupt.wasm"
    path.write_bytes(b"\0asm\x01\0\0\0" + b"\xff" * 64)
    return path


@pytest.mark.parametrize(
    "module, envoy_rejects, expect",
    [
        # Envoy's rejection, confirmed by its update_rejected stat.
        ("corrupt", True, "rejected version sha256:"),
        # keygate cannot tell a missing module from a path inside a container: Envoy decides.
        ("missing", True, "does not exist here"),
        # Not Wasm at all: keygate refuses before anything is written.
        ("not-wasm", False, "is not a Wasm module"),
    ],
)
def test_a_revocation_envoy_rejects_changes_nothing(running, tool, paths, tmp_path, module, envoy_rejects, expect):
    envoy, first_id, first = running
    if module == "corrupt":
        wasm = _corrupt_module(tmp_path)
    elif module == "missing":
        wasm = tmp_path / "no-such.wasm"
    else:
        wasm = tmp_path / "notes.txt"
        wasm.write_text("not a module\n")
    tool.set_wasm(wasm)
    store_before, ecds_before = tool.store.read_bytes(), tool.ecds.read_bytes()
    version_before = served_version(envoy)
    rejected_before = rejected(envoy)

    proc = tool.run("revoke", first_id, "--apply")
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("keygate: ") and len(err.splitlines()) == 1, err
    assert expect in err, err
    assert err.endswith("nothing was changed") or err.endswith(
        f"nothing was changed: {tool.store} and {tool.ecds} are as they were"
    ), err
    if envoy_rejects:
        assert f"Envoy at {admin_url(envoy)} rejected version" in err, err
        assert "update_rejected went from" in err and f"Envoy keeps serving version {version_before}" in err, err
        assert rejected(envoy) == rejected_before + 1
        assert envoy.wait_for_log(r"config update rejected")
    else:
        assert rejected(envoy) == rejected_before

    # Consistent: the store and the file are as before, and so is what Envoy serves.
    assert tool.store.read_bytes() == store_before
    assert tool.ecds.read_bytes() == ecds_before
    assert tool.json("verify", stdin=first)["accepted"] is True
    time.sleep(1.5)  # the put-back file is read by Envoy's watcher too
    assert [status(envoy, first) for _ in range(6)] == [200] * 6
    assert served_version(envoy) == version_before

    # A new key is not shown when its apply fails.
    proc = tool.run("create", "--name", "never", "--role", "client", "--apply")
    assert proc.returncode == 1 and proc.stdout == "", proc
    assert tool.store.read_bytes() == store_before

    # With the module put right, the same revocation is confirmed and takes effect.
    tool.set_wasm(paths.wasm)
    out = tool.ok("revoke", first_id, "--apply")
    assert out.splitlines()[-1].startswith("applied: Envoy at"), out
    assert [status(envoy, first) for _ in range(6)] == [401] * 6


def test_an_envoy_watching_another_file_times_out_and_changes_nothing(running, tool):
    envoy, first_id, first = running
    doc = json.loads(tool.store.read_text())
    doc["envoy"]["ecds"] = str(tool.workdir / "elsewhere" / "keygate.yaml")
    tool.store.write_text(json.dumps(doc, indent=2) + "\n")
    store_before = tool.store.read_bytes()
    started = time.monotonic()
    proc = tool.run("revoke", first_id, "--apply", "--apply-timeout", "2s")
    took = time.monotonic() - started
    assert proc.returncode == 1, proc
    assert "did not take up version" in proc.stderr and "within 2 s" in proc.stderr, proc.stderr
    assert "nothing was changed" in proc.stderr
    assert 2 <= took < 6, took
    assert tool.store.read_bytes() == store_before
    assert not (tool.workdir / "elsewhere" / "keygate.yaml").exists()
    assert status(envoy, first) == 200


def test_with_envoy_stopped_apply_writes_and_says_envoy_is_not_reachable(running, tool):
    envoy, first_id, first = running
    url = admin_url(envoy)
    envoy.stop()
    started = time.monotonic()
    proc = tool.run("revoke", first_id, "--apply")
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - started < 3
    assert proc.stdout.splitlines()[-1] == (
        f"written to {tool.ecds} (not confirmed: Envoy is not reachable at {url}: connection refused; "
        "the change is only written, and Envoy takes it up when it reads the file)"
    ), proc.stdout
    out = tool.json("apply")
    assert out["envoy"] == {"status": "unreachable", "admin": url, "seconds": None, "reason": "connection refused"}
    plugin = json.loads(json.loads(tool.ecds.read_text())["resources"][0]["typed_config"]["config"]["configuration"]["value"])
    assert [k["status"] for k in plugin["keys"]] == ["revoked"]
