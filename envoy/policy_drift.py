"""`make run`'s check of envoy/policy.json against the store's policy.

Usage: policy_drift.py FILE_POLICY STORE_POLICY [LAST_ADOPTED]

Prints, one per line, what differs between the store's policy and the file's
(`plans.free.requests: 60 -> 5`, `+ plans.gold: {...}`, `- ip_rules.deny`); routes are
named by their prefix. Exit status: 0 when they are the same, 1 when the file changed
since it was last adopted (LAST_ADOPTED missing or different: the file is newer, adopt
it), 2 when only the store changed (`keygate policy set`: keep the store's), 3 when a
file cannot be read as JSON.
"""

from __future__ import annotations

import json
import sys


def keyed(items: list) -> dict | None:
    """Routes by prefix, when every item is an object with a distinct prefix."""
    if not all(isinstance(i, dict) and isinstance(i.get("prefix"), str) for i in items):
        return None
    out = {f'[prefix={i["prefix"]}]': i for i in items}
    return out if len(out) == len(items) else None


def short(value) -> str:
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return text if len(text) <= 100 else text[:97] + "..."


def diff(old, new, path: str, out: list[str]) -> None:
    if old == new:
        return
    if isinstance(old, list) and isinstance(new, list):
        a, b = keyed(old), keyed(new)
        if a is not None and b is not None:
            old, new = a, b
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            sub = f"{path}{k}" if k.startswith("[") else (f"{path}.{k}" if path else k)
            if k not in new:
                out.append(f"- {sub}")
            elif k not in old:
                out.append(f"+ {sub}: {short(new[k])}")
            else:
                diff(old[k], new[k], sub, out)
        return
    out.append(f"{path or '(whole policy)'}: {short(old)} -> {short(new)}")


def load(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main() -> int:
    try:
        file_policy, store_policy = load(sys.argv[1]), load(sys.argv[2])
    except (OSError, ValueError) as e:
        print(f"cannot read a policy: {e}")
        return 3
    changes: list[str] = []
    diff(store_policy, file_policy, "", changes)
    if not changes:
        return 0
    for line in changes:
        print(f"  {line}")
    try:
        last = load(sys.argv[3]) if len(sys.argv) > 3 else None
    except (OSError, ValueError):
        last = None
    return 2 if last == file_policy else 1


if __name__ == "__main__":
    sys.exit(main())
