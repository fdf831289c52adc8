"""`make fleet-run` as a newcomer uses it: envoy/fleet/run.sh starts Redis, the rate-limit
service, two Envoys and the coordinator, prints a demo key and curl lines that show one
quota spent across both ports, and Ctrl-C stops everything it started. Run on ports and
a run directory of the test's own."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from harness import REPO_ROOT, free_port, port_accepts
from test_make_run import line_after, shell


def test_fleet_run_prints_working_lines_and_stops_on_ctrl_c(tmp_path):
    ports = {name: free_port() for name in
             ["PORT_A", "PORT_B", "ADMIN_A", "ADMIN_B", "UPSTREAM_PORT", "RLS_PORT", "REDIS_PORT"]}
    env = dict(os.environ, KEYGATE_FLEET_DIR=str(tmp_path / "fleet"),
               **{f"KEYGATE_{k}": str(v) for k, v in ports.items()})
    env.pop("KEYGATE_STORE", None)
    proc = subprocess.Popen(["bash", "envoy/fleet/run.sh"], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        banner = "".join(lines)
        assert "Ctrl-C stops" in banner, f"make fleet-run did not come up:\n{banner}"
        # The loop alternates between the two Envoys: one quota for both.
        loop = line_after(banner, "then 429 (with Retry-After), whichever Envoy they hit:")
        assert str(ports["PORT_A"]) in loop and str(ports["PORT_B"]) in loop, loop
        statuses = shell(loop).split()
        assert statuses == ["200"] * 5 + ["429"] * 3, (loop, statuses)
        quota = shell(line_after(banner, "The quota as the rate-limit service reports it:"))
        assert re.search(r"HTTP/1.1 429", quota) and re.search(r"(?i)x-ratelimit-limit: 5", quota), quota
        assert re.search(r"(?i)retry-after: \d+", quota), quota
        # What the service and both Envoys run on.
        for name in ["PORT_A", "PORT_B", "RLS_PORT", "REDIS_PORT"]:
            assert port_accepts(ports[name]), name
        # Ctrl-C: SIGINT to the whole foreground process group.
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "make fleet-run: stopped." in rest
        for name, port in ports.items():
            assert not port_accepts(port), f"{name} ({port}) still open after Ctrl-C"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
