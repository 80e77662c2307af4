"""Routing simulation: composition cache hit rate of 1-64 replicas under Zipf popularity, for
consistent hashing on the composition, consistent hashing with bounded loads, and round robin.

The model (pure Python, seconds):
- K distinct compositions; each request names composition of popularity rank k with
  probability proportional to 1/k^s, independently of the others (no bursts, no drift).
- Each replica keeps the C most recently used compositions (LRU by count, not bytes; one tier:
  memory and disk together). A request whose composition the replica does not hold is a miss:
  one merge, then it is held. Merges are instant: no request waits on another's merge, and
  there is no single-flight sharing across requests in flight.
- Routing sees only the composition: consistent hashing places each replica at 160 points on
  a ring (as nginx's `hash ... consistent` does) and sends a composition to the next point;
  bounded loads (Mirrokni et al., c = 1.25) walks on past replicas that already took more
  than c times the mean share of the requests so far; round robin ignores the composition.
  No replica fails or joins during a run.

Metrics: hit rate over all requests (cold start included, as in bench/routing.py), merges per
distinct composition requested (1.0: each merged once in the fleet), and the busiest
replica's share of requests over the mean share (1.0 = even).

`--check FILE` replays bench/routing.py's measured requests: the same sequence with the
model's cache (C from --check-capacity), once routed by the model and once by the replica
nginx actually chose (X-Loramix-Upstream), beside the measured hit rate.

    python -m bench.routing_sim
    python -m bench.routing_sim --check bench/results/routing_cpu.json
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import math
import random
from collections import Counter, OrderedDict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "routing_sim.json"
POLICIES = ("consistent_hash", "bounded_load", "round_robin")
POINTS_PER_REPLICA = 160
LOAD_BOUND = 1.25


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big")


class Ring:
    """A consistent-hash ring of `num_replicas` replicas, POINTS_PER_REPLICA points each."""

    def __init__(self, num_replicas: int) -> None:
        points = sorted((_hash(f"replica-{r}-{p}"), r) for r in range(num_replicas) for p in range(POINTS_PER_REPLICA))
        self.hashes = [h for h, _ in points]
        self.owners = [r for _, r in points]

    def walk(self, key: str):
        """Replicas in ring order from `key`'s point (the first is the key's owner)."""
        start = bisect.bisect(self.hashes, _hash(key))
        for i in range(len(self.owners)):
            yield self.owners[(start + i) % len(self.owners)]


class Router:
    def __init__(self, policy: str, num_replicas: int) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        self.policy, self.num_replicas = policy, num_replicas
        self.ring = Ring(num_replicas)
        self.loads = [0] * num_replicas
        self.num_routed = 0

    def route(self, key: str) -> int:
        if self.policy == "round_robin":
            replica = self.num_routed % self.num_replicas
        elif self.policy == "consistent_hash":
            replica = next(self.ring.walk(key))
        else:
            bound = math.ceil(LOAD_BOUND * (self.num_routed + 1) / self.num_replicas)
            replica = next(r for r in self.ring.walk(key) if self.loads[r] < bound)
        self.loads[replica] += 1
        self.num_routed += 1
        return replica


class LruCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: OrderedDict[str, None] = OrderedDict()

    def lookup(self, key: str) -> bool:
        """Whether `key` was held; it is held (most recent) afterwards."""
        if key in self.entries:
            self.entries.move_to_end(key)
            return True
        self.entries[key] = None
        if len(self.entries) > self.capacity:
            self.entries.popitem(last=False)
        return False


def zipf_requests(num_compositions: int, zipf_s: float, num_requests: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    keys = [f"composition-{k}" for k in range(num_compositions)]
    weights = [1 / rank**zipf_s for rank in range(1, num_compositions + 1)]
    return rng.choices(keys, weights, k=num_requests)


def replay(requests: list[str], replicas: list[int], num_replicas: int, capacity: int) -> dict:
    """Hit rate and merges of `requests` served by `replicas` (one index per request)."""
    caches = [LruCache(capacity) for _ in range(num_replicas)]
    hits = sum(caches[r].lookup(key) for key, r in zip(requests, replicas))
    loads = Counter(replicas)
    return {
        "hit_rate": hits / len(requests),
        "merges_per_composition": (len(requests) - hits) / len(set(requests)),
        "max_load_over_mean": max(loads.values()) * num_replicas / len(requests),
    }


def simulate(policy: str, num_replicas: int, capacity: int, requests: list[str]) -> dict:
    router = Router(policy, num_replicas)
    return replay(requests, [router.route(key) for key in requests], num_replicas, capacity)


def sweep(args) -> list[dict]:
    requests = zipf_requests(args.num_compositions, args.zipf_s, args.num_requests, args.seed)
    rows = []
    for num_replicas in args.replicas:
        row = {"replicas": num_replicas}
        for policy in POLICIES:
            row[policy] = simulate(policy, num_replicas, args.capacity, requests)
        rows.append(row)
    return rows


def check(path: Path, capacities: list[int]) -> list[dict]:
    """The model against bench/routing.py's measurement (its own request sequence)."""
    measured = json.loads(path.read_text())
    num_replicas = measured["settings"]["replicas"]
    rows = []
    for run in measured["policies"]:
        requests = [model for model, _, _ in run["trace"]]
        upstreams = sorted({u for _, u, _ in run["trace"] if u})
        actual = [upstreams.index(u) if u else 0 for _, u, _ in run["trace"]]
        routed = Router(run["policy"], num_replicas)
        modelled = [routed.route(key) for key in requests]
        for capacity in capacities:
            rows.append({
                "policy": run["policy"], "capacity": capacity,
                "measured_hit_rate": run["hit_rate"],
                "measured_merges_per_composition": run["merges_per_composition"],
                "model_with_nginx_routing": replay(requests, actual, num_replicas, capacity),
                "model": replay(requests, modelled, num_replicas, capacity),
            })
    return rows


def sweep_table(rows: list[dict]) -> str:
    lines = ["| replicas | " + " | ".join(f"{p} hit rate | {p} merges/comp" for p in POLICIES)
             + " | consistent_hash max/mean load | bounded_load max/mean load |",
             "|---" * (1 + 2 * len(POLICIES) + 2) + "|"]
    for row in rows:
        cells = [f"{row[p]['hit_rate']:.3f} | {row[p]['merges_per_composition']:.2f}" for p in POLICIES]
        lines.append(f"| {row['replicas']} | " + " | ".join(cells)
                     + f" | {row['consistent_hash']['max_load_over_mean']:.2f}"
                     + f" | {row['bounded_load']['max_load_over_mean']:.2f} |")
    return "\n".join(lines)


def check_table(rows: list[dict]) -> str:
    lines = ["| router | C | measured hit rate | model, nginx's routing | model, model's routing "
             "| measured merges/comp | model merges/comp (nginx's routing) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['policy']} | {row['capacity']} | {row['measured_hit_rate']:.3f} "
            f"| {row['model_with_nginx_routing']['hit_rate']:.3f} | {row['model']['hit_rate']:.3f} "
            f"| {row['measured_merges_per_composition']:.2f} "
            f"| {row['model_with_nginx_routing']['merges_per_composition']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3, 4, 8, 16, 32, 64])
    parser.add_argument("--num-compositions", type=int, default=1000, help="K")
    parser.add_argument("--capacity", type=int, default=50, help="C: compositions one replica caches")
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--num-requests", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", type=Path, help="bench/routing.py's JSON result to replay")
    parser.add_argument("--check-capacity", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    result = {"bench": "routing_sim", "settings": {k: v for k, v in vars(args).items()
                                                  if k not in ("out", "check", "check_capacity")},
              "sweep": sweep(args)}
    print(f"K={args.num_compositions} compositions, Zipf s={args.zipf_s}, C={args.capacity} per replica, "
          f"{args.num_requests} requests")
    print(sweep_table(result["sweep"]))
    if args.check:
        result["check"] = {"file": str(args.check), "rows": check(args.check, args.check_capacity)}
        print(check_table(result["check"]["rows"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
