"""Plans with several rates at once, the IETF RateLimit headers, and a rotated key's
successor spending its predecessor's buckets: in a real Envoy (--concurrency 2), with
requests spread over many connections so that both workers take from the same buckets.
"""

from __future__ import annotations

import re

from harness import key_hash
from test_limits import hammer

KEY = "plan_limits_key_000001"
SECOND = "plan_limits_key_000002"
OLD = "plan_limits_old_000003"
NEW = "plan_limits_new_000004"

# 10 a minute and 4 an hour: the hour's is the smaller limit.
HOURLY = [{"requests": 10, "per": "minute"}, {"requests": 4, "per": "hour"}]
# 3 a minute and 100 a day: the minute's runs out first.
DAILY = [{"requests": 3, "per": "minute"}, {"requests": 100, "per": "day"}]


def config(**extra) -> dict:
    doc = {
        "keys": [
            {"id": "two-1", "hash": key_hash(KEY), "role": "client", "plan": "hourly"},
            {"id": "two-2", "hash": key_hash(SECOND), "role": "client", "plan": "daily"},
            {"id": "old-1", "hash": key_hash(OLD), "role": "client", "plan": "hourly"},
            {"id": "new-1", "hash": key_hash(NEW), "role": "client", "plan": "hourly",
             "shares_quota_with": "old-1"},
        ],
        "plans": {"hourly": HOURLY, "daily": DAILY},
    }
    doc.update(extra)
    return doc


def test_a_two_rate_plan_refuses_at_the_smaller_limit_and_reports_it(start_envoy):
    envoy = start_envoy(config(), concurrency=2)
    results = hammer(envoy.port, KEY, total=60, connections=12)
    statuses = [s for s, _ in results]
    print(f"4 an hour and 10 a minute: {statuses.count(200)} of 60 admitted")
    # Every admitted request holds a token of both buckets: exactly the hour's 4.
    assert statuses.count(200) == 4, statuses
    assert statuses.count(429) == 56, statuses
    for status, headers in results:
        if status == 200:
            # The hour's bucket is the closer to running out (3 of 4 left < 9 of 10).
            assert headers["x-ratelimit-limit"] == "4", headers
        else:
            assert headers["x-ratelimit-limit"] == "4", headers
            assert headers["x-ratelimit-remaining"] == "0", headers
            # A token every 15 minutes: Retry-After is the hour's wait.
            assert 1 <= int(headers["retry-after"]) <= 900, headers
    assert sorted(int(h["x-ratelimit-remaining"]) for s, h in results if s == 200) == [0, 1, 2, 3]


def test_refusals_by_one_rate_take_nothing_from_the_others(start_envoy):
    envoy = start_envoy(config(rate_limit_headers="ietf"), concurrency=2)
    results = hammer(envoy.port, SECOND, total=40, connections=8)
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 3, statuses
    refused = [h for s, h in results if s == 429]
    assert len(refused) == 37
    policy = '"daily/minute";q=3;w=60, "daily/day";q=100;w=86400'
    for headers in refused:
        assert headers["ratelimit-policy"] == policy, headers
        m = re.fullmatch(r'"daily/minute";r=0;t=(\d+), "daily/day";r=(\d+);t=(\d+)', headers["ratelimit"])
        assert m, headers["ratelimit"]
        # Only the 3 admitted requests were taken from the day's bucket: the 37 refused
        # by the minute's gave theirs back.
        assert m.group(2) == "97", headers["ratelimit"]
        assert 1 <= int(m.group(1)) <= 20 and int(headers["retry-after"]) == int(m.group(1))
        assert "x-ratelimit-limit" not in headers
    admitted = [h for s, h in results if s == 200]
    for headers in admitted:
        assert headers["ratelimit-policy"] == policy
        assert re.fullmatch(r'"daily/minute";r=[0-2];t=\d+, "daily/day";r=9[7-9];t=\d+',
                            headers["ratelimit"]), headers["ratelimit"]
    # A real example for the documentation.
    r = envoy.request("GET", "/v1/work", [("x-api-key", SECOND)])
    print(f"429 example: RateLimit-Policy: {r.header('ratelimit-policy')}")
    print(f"429 example: RateLimit: {r.header('ratelimit')}")
    print(f"429 example: Retry-After: {r.header('retry-after')}")
    fresh = envoy.request("GET", "/v1/work", [("x-api-key", KEY)])
    print(f"200 example: RateLimit-Policy: {fresh.header('ratelimit-policy')}")
    print(f"200 example: RateLimit: {fresh.header('ratelimit')}")
    assert fresh.status == 200
    assert fresh.header("ratelimit-policy") == '"hourly/minute";q=10;w=60, "hourly/hour";q=4;w=3600'
    assert re.fullmatch(r'"hourly/minute";r=9;t=\d+, "hourly/hour";r=3;t=\d+', fresh.header("ratelimit"))


def test_a_successor_spends_every_bucket_of_its_predecessor(start_envoy):
    envoy = start_envoy(config(), concurrency=2)
    old = hammer(envoy.port, OLD, total=6, connections=3)
    assert [s for s, _ in old].count(200) == 4
    # The hour's bucket the two keys share is empty: the successor gets nothing more.
    new = hammer(envoy.port, NEW, total=6, connections=3)
    assert [s for s, _ in new].count(200) == 0, new
    # A key of the same plan that shares nothing is untouched.
    r = envoy.request("GET", "/v1/work", [("x-api-key", KEY)])
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "3", r


def test_published_plans_keep_one_rate(start_envoy):
    envoy = start_envoy(
        {"keys": [{"id": "free-1", "hash": key_hash(KEY), "role": "client", "plan": "free"}],
         "rate_limit_headers": "ietf"})
    r = envoy.request("GET", "/v1/work", [("x-api-key", KEY)])
    assert r.status == 200, r
    assert r.header("ratelimit-policy") == '"free/minute";q=60;w=60'
    assert re.fullmatch(r'"free/minute";r=59;t=1', r.header("ratelimit")), r.header("ratelimit")


def test_an_invalid_rate_list_is_refused_by_envoy(start_envoy):
    envoy = start_envoy.expecting_failure(config(plans={"hourly": [], "daily": DAILY}))
    envoy.wait_exit(20)
    assert "plans.hourly: an empty list of rates" in envoy.log()
