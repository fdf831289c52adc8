"""`make run` as a newcomer uses it: envoy/run.sh starts Envoy and the coordinator, prints
a demo key and curl lines that do what they say, takes key changes without a restart, and
stops cleanly on Ctrl-C. Run on ports and a run directory of the test's own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import REPO_ROOT, free_port, port_accepts


class MakeRun:
    def __init__(self, run_dir: Path, policy: Path | None = None):
        self.run_dir = run_dir
        self.port, self.admin, self.upstream = free_port(), free_port(), free_port()
        self.env = dict(
            os.environ,
            KEYGATE_RUN_DIR=str(run_dir),
            KEYGATE_PORT=str(self.port),
            KEYGATE_ADMIN_PORT=str(self.admin),
            KEYGATE_UPSTREAM_PORT=str(self.upstream),
        )
        self.env.pop("KEYGATE_STORE", None)
        if policy is not None:
            self.env["KEYGATE_POLICY"] = str(policy)
        self.proc: subprocess.Popen | None = None
        self.banner = ""

    def start_fails(self) -> tuple[int, str]:
        """Runs make run expecting it to refuse to start: its exit status and output."""
        proc = subprocess.run(["bash", "envoy/run.sh"], cwd=REPO_ROOT, env=self.env, text=True,
                              capture_output=True, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    def start(self) -> str:
        self.proc = subprocess.Popen(
            ["bash", "envoy/run.sh"], cwd=REPO_ROOT, env=self.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        lines = []
        deadline = time.monotonic() + 60
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        self.banner = "".join(lines)
        assert "Ctrl-C stops" in self.banner, f"make run did not come up:\n{self.banner}"
        return self.banner

    def ctrl_c(self) -> tuple[int, str]:
        assert self.proc is not None
        # What the terminal does on Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(self.proc.pid, signal.SIGINT)
        rest, _ = self.proc.communicate(timeout=20)
        return self.proc.returncode, rest

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def shell(line: str) -> str:
    return subprocess.run(["bash", "-c", line], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=30, check=True).stdout


def line_after(banner: str, title: str) -> str:
    lines = banner.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(title):
            return lines[i + 1].strip()
    raise AssertionError(f"no {title!r} in:\n{banner}")


@pytest.fixture
def make_run(tmp_path):
    runs = []

    def new(policy: Path | None = None):
        r = MakeRun(tmp_path / "run", policy)
        runs.append(r)
        return r

    yield new
    for r in runs:
        r.stop()


def test_make_run_prints_a_demo_key_and_curl_lines_that_work(make_run):
    run = make_run()
    banner = run.start()
    key = re.search(r"^  (kg_[A-Za-z0-9_-]+)$", banner, re.M)
    assert key, banner
    key = key.group(1)
    demo_id = re.search(r"Demo key (\S+)", banner).group(1)

    ok = shell(line_after(banner, "200,"))
    assert f'"x-keygate-key-id":"{demo_id}"' in ok
    assert key not in ok and "x-api-key" not in ok

    unauthorized = shell(line_after(banner, "401,"))
    assert unauthorized.startswith("HTTP/1.1 401")
    assert '"error":"missing_api_key"' in unauthorized

    forbidden = shell(line_after(banner, "403,"))
    assert forbidden.startswith("HTTP/1.1 403")
    assert '"error":"insufficient_permissions"' in forbidden

    time.sleep(0.4)  # counters lag requests by up to 250 ms (docs/operations.md, Observability)
    counters = shell(line_after(banner, "Counters"))
    assert re.search(r"^keygate_allowed\S* 1$", counters, re.M), counters
    # The access log the banner names has a line per request, naming the demo key's id.
    access_log = line_after(banner, "Access log").split()[-1]
    key_id = re.search(r"Demo key (\S+)", banner).group(1)
    deadline = time.monotonic() + 5  # Envoy flushes access logs about once a second
    logged = ""
    while time.monotonic() < deadline and "keygate_missing_api_key" not in logged:
        time.sleep(0.2)
        logged = Path(access_log).read_text()
    assert key_id in logged and "keygate_missing_api_key" in logged, logged

    # The key-management lines, with the store the banner names: an admin key created
    # while Envoy runs is accepted within about a second.
    store = re.search(r"export KEYGATE_STORE=(\S+)", banner).group(1)
    created = shell(f"KEYGATE_STORE={store} target/release/keygate --json create "
                    "--name me --role admin --apply")
    admin_key = re.search(r'"key":\s*"([^"]+)"', created).group(1)
    deadline = time.monotonic() + 3
    status = ""
    while time.monotonic() < deadline:
        status = shell(f"curl -s -o /dev/null -w '%{{http_code}}' -H 'X-Api-Key: {admin_key}' "
                       f"http://127.0.0.1:{run.port}/v1/admin/users")
        if status == "200":
            break
        time.sleep(0.1)
    assert status == "200"

    code, rest = run.ctrl_c()
    assert code == 0, rest
    assert "make run: stopped." in rest
    for port in (run.port, run.admin, run.upstream):
        assert not port_accepts(port)

    # A second start keeps the store (the admin key) and revokes the first demo key.
    again = make_run()
    banner2 = again.start()
    url = f"http://127.0.0.1:{again.port}/v1/admin/users"
    assert shell(f"curl -s -o /dev/null -w '%{{http_code}}' -H 'X-Api-Key: {admin_key}' {url}") == "200"
    old = shell(f"curl -s -H 'X-Api-Key: {key}' {url}")
    assert '"error":"key_revoked"' in old
    assert key not in banner2
    code, _ = again.ctrl_c()
    assert code == 0


def spend(port: int, key: str, n: int) -> list[str]:
    """n POSTs to /v1/jobs with the key: their status codes."""
    return [shell(f"curl -s -o /dev/null -w '%{{http_code}}' -X POST -H 'X-Api-Key: {key}' "
                  f"http://127.0.0.1:{port}/v1/jobs") for _ in range(n)]


def demo_key(banner: str) -> str:
    found = re.search(r"^  (kg_[A-Za-z0-9_-]+)$", banner, re.M)
    assert found, banner
    return found.group(1)


def test_make_run_adopts_an_edited_policy_file_and_keeps_a_policy_set_with_the_tool(
        make_run, tmp_path):
    policy_file = tmp_path / "policy.json"
    policy = json.loads((REPO_ROOT / "envoy" / "policy.json").read_text())
    policy_file.write_text(json.dumps(policy))
    first = make_run(policy_file)
    banner = first.start()
    assert "make run: " not in banner.split("keygate is running")[0], banner
    first.ctrl_c()

    # The file is edited between runs: the next start applies it, saying what changed,
    # and the demo key (plan free) gets the new limit.
    policy["plans"]["free"] = {"requests": 3, "per": "minute"}
    policy_file.write_text(json.dumps(policy))
    second = make_run(policy_file)
    banner = second.start()
    assert "changed since the store took it; applying it" in banner, banner
    assert "  plans.free.requests: 60 -> 3" in banner, banner
    kept = re.search(r"previous policy is in (\S+)\):", banner).group(1)
    assert json.loads(Path(kept).read_text())["plans"]["free"]["requests"] == 60
    assert spend(second.port, demo_key(banner), 4) == ["200", "200", "200", "429"]
    second.ctrl_c()

    # The policy is changed with the tool: the next start keeps the store's, and says how
    # the file differs.
    store = tmp_path / "run" / "keygate.json"
    tool_policy = dict(policy, plans=dict(policy["plans"], free={"requests": 2, "per": "minute"}))
    (tmp_path / "tool.json").write_text(json.dumps(tool_policy))
    shell(f"target/release/keygate --store {store} policy set {tmp_path / 'tool.json'}")
    third = make_run(policy_file)
    banner = third.start()
    assert "it was changed with 'keygate policy set'); keeping the store's" in banner, banner
    assert "  plans.free.requests: 2 -> 3" in banner, banner
    assert spend(third.port, demo_key(banner), 3) == ["200", "200", "429"]
    third.ctrl_c()

    # A file the filter would refuse stops make run with the reason; the store is unchanged.
    before = store.read_bytes()
    policy["plans"]["free"] = {"requests": 0, "per": "minute"}
    policy_file.write_text(json.dumps(policy))
    code, out = make_run(policy_file).start_fails()
    assert code == 1, out
    assert 'plans["free"].requests' in out and "was not applied" in out, out
    assert store.read_bytes() == before
