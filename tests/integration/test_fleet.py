"""A fleet: real Redis, the real keygate-ratelimit service, several real Envoys
(--concurrency 2) with the real .wasm, all watching one ECDS file written by the keygate
tool. One quota per key across every instance; what happens when Redis or the service
fails, and when they come back."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from harness import Ecds, RateLimitService, Redis, SharedLimit

POLICY = {
    "routes": [{"prefix": "/healthz", "public": True}],
    "plans": {
        "hourly50": {"requests": 50, "per": "hour"},
        "hourly5": {"requests": 5, "per": "hour"},
        "flex": {"requests": 5, "per": "hour"},
    },
    "default_plan": "free",
    "shared_rate_limit": True,
}

# The rate-limit filter's timeout in these Envoys, and what a request may take on top of
# it on a loaded 2-core machine.
TIMEOUT_S = 0.05
MARGIN_S = 0.45


class Tool:
    """The keygate command line on the fleet's store."""

    def __init__(self, cli: Path, workdir: Path, wasm: Path):
        self.cli = cli
        self.store = workdir / "keygate.json"
        self.ecds = workdir / "ecds" / "keygate.yaml"
        self.ecds.parent.mkdir()
        policy = workdir / "policy.json"
        policy.write_text(json.dumps(POLICY))
        self.run("init", "--ecds", str(self.ecds), "--wasm", str(wasm), "--policy", str(policy))

    def run(self, *args: str) -> str:
        proc = subprocess.run([str(self.cli), "--store", str(self.store), *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"keygate {' '.join(args)} failed: {proc.stderr}"
        return proc.stdout

    def create(self, plan: str) -> tuple[str, str]:
        out = json.loads(self.run("--json", "create", "--name", "fleet", "--role", "client",
                                  "--plan", plan, "--apply"))
        return out["id"], out["key"]


class Fleet:
    def __init__(self, tool, redis, service, envoys):
        self.tool, self.redis, self.service, self.envoys = tool, redis, service, envoys

    def key(self, plan: str, *envoys) -> str:
        """A new key on `plan`, once every Envoy (or those given) accepts it."""
        _, key = self.tool.create(plan)
        for envoy in envoys or self.envoys.values():
            deadline = time.monotonic() + 10
            while get(envoy, key)[0] in (401, 500):
                assert time.monotonic() < deadline, "the new key did not reach Envoy"
                time.sleep(0.05)
        return key


def get(envoy, key: str | None, path: str = "/v1/work"):
    """(status, headers, body, seconds) of one request on a new connection."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", envoy.port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-Api-Key": key} if key else {})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, time.monotonic() - start
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fleet(paths, tmp_path_factory, module_envoy_starter):
    work = tmp_path_factory.mktemp("fleet")
    redis = Redis(work).start()
    tool = Tool(paths.cli, work, paths.wasm)
    service = RateLimitService(paths.cli.parent / "keygate-ratelimit", work, tool.store, redis.url)
    # keygate needs a first key before Envoy can start on the ECDS file.
    tool.create("hourly50")
    service.start()
    start = lambda **kw: module_envoy_starter(Ecds(tool.ecds), ratelimit=SharedLimit(service.port, **kw))
    envoys = {
        "a": start(),
        "b": start(),
        "closed": start(fail_closed=True),
        "open_hc": start(health_checked=True),
        "closed_hc": start(fail_closed=True, health_checked=True),
    }
    yield Fleet(tool, redis, service, envoys)
    service.stop()
    redis.stop()


def test_one_quota_per_key_across_two_envoys(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    key = fleet.key("hourly50", a, b)
    # (fleet.key spent one request per Envoy making sure the key had arrived.)
    spent = 2

    def one(i: int) -> int:
        return get((a, b)[i % 2], key)[0]

    with concurrent.futures.ThreadPoolExecutor(max_workers=24) as pool:
        statuses = list(pool.map(one, range(300)))
    admitted = statuses.count(200)
    print(f"300 requests alternating over 2 Envoys: {admitted} admitted (+{spent} before)")
    assert admitted + spent == 50, {s: statuses.count(s) for s in set(statuses)}
    assert set(statuses) == {200, 429}
    for envoy in (a, b):
        status, headers, body, _ = get(envoy, key)
        assert status == 429
        assert json.loads(body) == {"error": "rate_limited", "message": "Rate limit exceeded"}
        assert int(headers["retry-after"]) >= 1
        assert headers["x-ratelimit-limit"] == "50" and headers["x-ratelimit-remaining"] == "0"
    # Another key is unaffected, and its quota is reported by the service.
    other = fleet.key("hourly50", a, b)
    status, headers, _, _ = get(b, other)
    assert status == 200
    assert headers["x-ratelimit-limit"] == "50"
    assert int(headers["x-ratelimit-remaining"]) == 50 - 3
    assert headers.get("x-ratelimit-remaining") is not None
    # Public routes never reach the service: nothing to count.
    assert get(a, None, "/healthz")[0] == 200


def test_a_plan_changed_with_the_tool_is_enforced_without_a_restart(fleet, tmp_path):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    pid = fleet.service.proc.pid
    policy = json.loads(json.dumps(POLICY))
    policy["plans"]["flex"] = {"requests": 8, "per": "hour"}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    fleet.tool.run("policy", "set", str(tmp_path / "policy.json"), "--apply")
    # The service follows the store: a probe key sees the new limit within seconds.
    probe = fleet.key("flex", a)
    deadline = time.monotonic() + 5
    while get(a, probe)[1].get("x-ratelimit-limit") != "8":
        assert time.monotonic() < deadline, "the service did not take up the changed plan"
        time.sleep(0.2)
    key = fleet.key("flex", a, b)  # 2 of the shared 8
    statuses = [get((a, b)[i % 2], key)[0] for i in range(12)]
    assert statuses.count(200) == 6, statuses
    assert fleet.service.proc.pid == pid and fleet.service.proc.poll() is None
    assert "plans" in fleet.service.log()


def over_limit(envoy) -> int:
    stats = envoy.admin_get("/stats?filter=cluster.coordinator.ratelimit.over_limit$")
    return int(stats.split(": ")[-1]) if ": " in stats else 0


def test_shared_refusals_are_counted_apart_from_local_ones(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    # Waiting until both Envoys have the key spends one shared token on each and one of
    # a's own 5 (b's own bucket is not asked about again below).
    key = fleet.key("hourly5", a, b)
    assert [get(b, key)[0] for _ in range(2)] == [200] * 2  # shared: 4 spent
    shared_before, local_before = over_limit(a), a.counter("keygate_rate_limited")
    # a's own bucket still holds 4; the shared one holds 1.
    assert [get(a, key)[0] for _ in range(4)] == [200, 429, 429, 429]
    assert over_limit(a) - shared_before == 3
    assert a.counter("keygate_rate_limited") == local_before


def _stop(proc) -> None:
    proc.stop()


def test_redis_down_fail_open_and_fail_closed_then_back(fleet):
    a, closed = fleet.envoys["a"], fleet.envoys["closed"]
    key = fleet.key("hourly5", a, closed)
    fleet.redis.stop()
    try:
        # Fail open: each instance's own bucket still caps the key (5 an hour, one spent).
        results = [get(a, key) for _ in range(7)]
        assert [r[0] for r in results] == [200] * 4 + [429] * 3, [r[0] for r in results]
        # Fail closed: refused, with keygate's JSON shape.
        for _ in range(3):
            status, _, body, took = get(closed, key)
            assert status == 503, (status, body)
            assert json.loads(body)["error"] == "rate_limit_unavailable"
            results.append((status, {}, body, took))
        slowest = max(r[3] for r in results)
        print(f"Redis down: slowest request {slowest * 1000:.0f} ms")
        assert slowest < TIMEOUT_S + MARGIN_S
    finally:
        fleet.redis.start()
    # Back without restarting anything: the service answers again (its quota headers are
    # on admitted requests), and the shared count holds across both Envoys again.
    b = fleet.envoys["b"]
    probe = fleet.key("hourly50", a)
    deadline = time.monotonic() + 10
    while "x-ratelimit-limit" not in get(a, probe)[1]:
        assert time.monotonic() < deadline, "the shared limit did not come back"
        time.sleep(0.2)
    fresh = fleet.key("hourly5", a, b)  # 2 of the shared 5; 1 of each Envoy's own 5
    statuses = [get((a, b)[i % 2], fresh)[0] for i in range(8)]
    assert statuses.count(200) == 3, statuses


@pytest.mark.parametrize("how", ["stopped", "hung"])
def test_service_down_or_hung_never_holds_a_request(fleet, how):
    envoys = fleet.envoys
    key = fleet.key("hourly50", envoys["a"], envoys["closed"], envoys["open_hc"], envoys["closed_hc"])
    if how == "stopped":
        fleet.service.stop()
    else:
        os.kill(fleet.service.proc.pid, signal.SIGSTOP)
    try:
        if how == "stopped":
            # The health-checked clusters must have no healthy endpoint left.
            for name in ("open_hc", "closed_hc"):
                deadline = time.monotonic() + 5
                while "membership_healthy: 0" not in envoys[name].admin_get(
                        "/stats?filter=cluster.keygate_ratelimit.membership_healthy"):
                    assert time.monotonic() < deadline, "the service's endpoint still looks healthy"
                    time.sleep(0.1)
        took = []
        for name, want in [("a", 200), ("open_hc", 200), ("closed", 503), ("closed_hc", 503)]:
            for _ in range(3):
                status, _, body, seconds = get(envoys[name], key)
                assert status == want, (name, status, body)
                took.append(seconds)
        print(f"service {how}: slowest request {max(took) * 1000:.0f} ms")
        assert max(took) < TIMEOUT_S + MARGIN_S
    finally:
        if how == "stopped":
            fleet.service.start()
        else:
            os.kill(fleet.service.proc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 10
    while get(envoys["closed"], key)[0] != 200:
        assert time.monotonic() < deadline, "the fail-closed Envoy did not recover"
        time.sleep(0.2)


# ------------------------------------------------- several rates, rotated keys, in a fleet

from harness import key_hash  # noqa: E402

ROTATED_POLICY = {
    "plans": {
        "shared4": {"requests": 4, "per": "hour"},
        # 30 a minute and 6 an hour: the hour's is the smaller limit.
        "two": [{"requests": 30, "per": "minute"}, {"requests": 6, "per": "hour"}],
    },
    "default_plan": "shared4",
    "shared_rate_limit": True,
}

OLD_KEY = "fleet_rotated_old_00001"
NEW_KEY = "fleet_rotated_new_00002"
LEGACY_OLD = "fleet_legacy_old_000003"
LEGACY_NEW = "fleet_legacy_new_000004"
TWO_KEY = "fleet_two_rates_0000005"


def rotated_plugin_config() -> dict:
    """The filter's configuration of these Envoys, written out (the tool's store gives the
    service the same plans): two pairs of keys where the second shares the first's quota."""
    key = lambda id_, secret, **kw: {"id": id_, "hash": key_hash(secret), "role": "client", **kw}
    return {
        **ROTATED_POLICY,
        "keys": [
            key("old-1", OLD_KEY),
            key("new-1", NEW_KEY, shares_quota_with="old-1"),
            key("legacy-old", LEGACY_OLD),
            key("legacy-new", LEGACY_NEW, shares_quota_with="legacy-old"),
            key("two-1", TWO_KEY, plan="two"),
        ],
    }


@pytest.fixture(scope="module")
def rotated(paths, tmp_path_factory, module_envoy_starter):
    work = tmp_path_factory.mktemp("rotated")
    redis = Redis(work).start()
    store = work / "keygate.json"
    policy = work / "policy.json"
    policy.write_text(json.dumps(ROTATED_POLICY))
    ecds = work / "ecds" / "keygate.yaml"
    ecds.parent.mkdir()
    proc = subprocess.run([str(paths.cli), "--store", str(store), "init", "--ecds", str(ecds),
                           "--wasm", str(paths.wasm), "--policy", str(policy)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    service = RateLimitService(paths.cli.parent / "keygate-ratelimit", work, store, redis.url).start()
    config = rotated_plugin_config()
    start = lambda **kw: module_envoy_starter(config, ratelimit=SharedLimit(service.port, **kw))
    envoys = {
        "a": start(),
        "b": start(),
        # A configuration from before x-keygate-quota-id: the descriptor reads the key id.
        "legacy": start(key_id_header="x-keygate-key-id"),
    }
    yield envoys
    service.stop()
    redis.stop()


def test_a_successor_spends_its_predecessors_shared_budget(rotated):
    a, b = rotated["a"], rotated["b"]
    # The predecessor spends the shared 4 over both Envoys: 2 of each one's own 4.
    assert [get((a, b)[i % 2], OLD_KEY)[0] for i in range(4)] == [200] * 4
    # Each Envoy's own bucket (shared with the predecessor there) still holds 2, but the
    # fleet's budget, counted under the predecessor's id, is spent: the service refuses.
    for envoy in (a, b):
        status, headers, body, _ = get(envoy, NEW_KEY)
        assert status == 429, (status, body)
        assert headers["x-ratelimit-limit"] == "4" and headers["x-ratelimit-remaining"] == "0"
    assert over_limit(a) >= 1 and over_limit(b) >= 1
    assert a.counter("keygate_rate_limited") == 0 and b.counter("keygate_rate_limited") == 0


def test_a_descriptor_of_the_key_id_still_works(rotated):
    """A fleet configuration from before x-keygate-quota-id keeps its shared limit (each
    key counted under its own id, so a successor does not share its predecessor's fleet
    budget; the filter's own bucket, shared with the predecessor, still holds it)."""
    legacy = rotated["legacy"]
    results = [get(legacy, LEGACY_OLD) for _ in range(4)]
    assert [r[0] for r in results] == [200] * 4
    # The service answered each (keygate leaves admitted requests' headers to it).
    assert [r[1].get("x-ratelimit-remaining") for r in results] == ["3", "2", "1", "0"]
    before = legacy.counter("keygate_rate_limited")
    assert [get(legacy, LEGACY_NEW)[0] for _ in range(2)] == [429, 429]
    assert legacy.counter("keygate_rate_limited") == before + 2


def test_several_rates_hold_across_the_fleet(rotated):
    a, b = rotated["a"], rotated["b"]
    # Each Envoy's own buckets would admit 6 each; the fleet's admit 6 in all.
    results = [get((a, b)[i % 2], TWO_KEY) for i in range(12)]
    statuses = [r[0] for r in results]
    assert statuses.count(200) == 6, statuses
    for status, headers, _, _ in results:
        # The hour's bucket is the closer to running out; the service reports it.
        assert headers["x-ratelimit-limit"] == "6", headers
        if status == 429:
            assert headers["x-ratelimit-remaining"] == "0"
            assert 1 <= int(headers["retry-after"]) <= 600
