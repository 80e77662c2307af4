"""Routing bench: loramix replicas behind a real nginx, routed by composition (consistent
hashing on the request's `model`, deploy/router/) against round robin, same requests.

Starts --replicas loramix servers on loopback (skill-lab demo, local engine), each with a
small memory tier and its own small disk tier (so a composition the replica has not kept is
merged again), puts nginx in front with one policy, and sends one fixed request sequence:
streamed completions whose compositions (subsets of the four skills, weights, methods) are
drawn with Zipf-skewed popularity. Then the same with fresh replicas and the other policy.

Per policy: composition cache hit rate and merges, read from the replicas' /metrics; merges
per distinct composition (1.0 = each merged once in the whole fleet); replicas that served
each composition (from nginx's X-Loramix-Upstream header); TTFT p50/p99 at the client;
errors (non-200 or a stream without finish_reason).

    python -m bench.routing                       # 3 replicas, 300 requests per policy
    python -m bench.routing --num-requests 60 --out /tmp/routing.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.nginx_router import POLICIES, NginxRouter
from bench.serve_throughput import Server, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "routing_cpu.json"
SKILLS = ("add", "reverse", "sort", "upper")
PROMPTS = ("reverse: server =>", "upper: merged =>", "sort: dcba =>", "add: 57+68 =>", "reverse upper: vector =>")


def compositions() -> list[str]:
    """Model strings of distinct compositions of the skill-lab skills: every subset of 2-4
    skills with equal weights by cat, linear and svd; 2-skill subsets also at 0.7/0.3 and
    0.3/0.7, and by lego at equal weights (lego is the slowest merge here, a few seconds)."""
    models = []
    for size in (2, 3, 4):
        for subset in itertools.combinations(SKILLS, size):
            weightings = ["+".join(subset)]
            if size == 2:
                a, b = subset
                weightings += [f"{a}*0.7+{b}*0.3", f"{a}*0.3+{b}*0.7"]
            models += [f"{terms}@{method}" for terms in weightings for method in ("cat", "linear", "svd")]
            if size == 2:
                models.append("+".join(subset) + "@lego")
    return models


def zipf_workload(num_requests: int, zipf_s: float, seed: int) -> list[tuple[str, str]]:
    """(model, prompt) pairs: composition of popularity rank k drawn with weight 1/k^s (ranks
    assigned to compositions in a seeded random order)."""
    rng = random.Random(seed)
    models = compositions()
    rng.shuffle(models)
    weights = [1 / rank**zipf_s for rank in range(1, len(models) + 1)]
    return [(rng.choices(models, weights)[0], rng.choice(PROMPTS)) for _ in range(num_requests)]


def start_replica(base: Path, skills: Path, work: Path, args) -> Server:
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--engine", "local", "--base-model", str(base), "--skills-dir", str(skills),
        "--served-model-name", "loramix-demo", "--cache-dir", str(work / "cache"),
        "--memory-cache-bytes", str(args.memory_cache_bytes), "--disk-cache-bytes", str(args.disk_cache_bytes),
        "--disk-cache-grace-seconds", "0.5", "--log-level", "warning",
    ]
    return Server(cmd, port, work / "server.log")


async def _one(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    record = {"model": model, "ttft_s": None, "upstream": None, "error": None}
    try:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            record["upstream"] = response.headers.get("x-loramix-upstream")
            if response.status_code != 200:
                record["error"] = f"{response.status_code} {(await response.aread())[:200]!r}"
                return record
            finished = False
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record["error"] = f"stream error {chunk['error'].get('code')}"
                    return record
                if record["ttft_s"] is None:
                    record["ttft_s"] = time.perf_counter() - started
                finished = finished or any(c.get("finish_reason") for c in chunk["choices"])
            if not finished:
                record["error"] = "stream ended without finish_reason"
    except httpx.HTTPError as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    return record


async def drive(url: str, workload: list[tuple[str, str]], concurrency: int, max_tokens: int) -> list[dict]:
    """Send `workload` in order with `concurrency` requests in flight."""
    queue = list(enumerate(workload))
    records: list[dict | None] = [None] * len(workload)

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            index, (model, prompt) = queue.pop(0)
            records[index] = await _one(http, model, prompt, max_tokens)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return records


def scrape(url: str) -> dict:
    """The cache and merge counters of one replica."""
    samples: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "loramix_composition_cache_hits_total":
                samples[f"hits_{sample.labels['tier']}"] += sample.value
            elif sample.name == "loramix_composition_cache_misses_total":
                samples["misses"] += sample.value
            elif sample.name == "loramix_composition_cache_evictions_total":
                samples[f"evictions_{sample.labels['tier']}"] += sample.value
            elif sample.name == "loramix_merges_total":
                samples["merges"] += sample.value
            elif sample.name == "loramix_merge_seconds_sum":
                samples["merge_seconds"] += sample.value
            elif sample.name == "loramix_requests_total" and sample.labels["endpoint"] == "/v1/completions":
                samples["requests"] += sample.value
    return dict(samples)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(policy: str, records: list[dict], replicas: list[dict], wall_s: float) -> dict:
    totals = Counter()
    for replica in replicas:
        totals.update(replica)
    hits = totals["hits_memory"] + totals["hits_disk"]
    lookups = hits + totals["misses"]
    distinct = {r["model"] for r in records}
    served_by = defaultdict(set)
    for r in records:
        if r["upstream"]:
            served_by[r["model"]].add(r["upstream"])
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    errors = [r["error"] for r in records if r["error"]]
    return {
        "policy": policy,
        "num_requests": len(records),
        "num_compositions": len(distinct),
        "hit_rate": hits / lookups if lookups else None,
        "memory_hit_rate": totals["hits_memory"] / lookups if lookups else None,
        "merges": int(totals["merges"]),
        "merges_per_composition": totals["merges"] / len(distinct),
        "merge_seconds": totals["merge_seconds"],
        "replicas_per_composition": sum(len(s) for s in served_by.values()) / max(1, len(served_by)),
        "requests_per_replica": [int(r.get("requests", 0)) for r in replicas],
        "ttft_p50_ms": 1000 * percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_ms": 1000 * percentile(ttfts, 99) if ttfts else None,
        "ttft_mean_ms": 1000 * sum(ttfts) / len(ttfts) if ttfts else None,
        "errors": len(errors),
        "error_examples": errors[:5],
        "wall_s": wall_s,
        "replicas": replicas,
        # per request, in workload order: for bench/routing_sim.py's trace replay
        "trace": [[r["model"], r["upstream"], None if r["ttft_s"] is None else round(r["ttft_s"], 4)]
                  for r in records],
    }


def run_policy(policy: str, workload: list[tuple[str, str]], demo, args, work: Path) -> dict:
    """Fresh replicas (empty caches) behind nginx with `policy`; the workload; their counters."""
    servers = []
    router = None
    try:
        with ThreadPoolExecutor(args.replicas) as pool:  # start-up in parallel
            starting = [pool.submit(start_replica, demo.base_dir, demo.skills_dir, work / f"replica{index}", args)
                        for index in range(args.replicas)]
            failures = []
            for future in starting:  # every started replica is kept, so that all are stopped
                try:
                    servers.append(future.result())
                except BaseException as exc:  # Server raises SystemExit with the replica's log
                    failures.append(exc)
            if failures:
                raise failures[0]
        for server in servers:  # first-request costs (torch, tokenizer) are not the router's
            httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"model": "loramix-demo", "prompt": PROMPTS[0], "max_tokens": 2})
        before = [scrape(server.url) for server in servers]
        router = NginxRouter([server.url.removeprefix("http://") for server in servers], policy, work / "nginx")
        started = time.perf_counter()
        records = asyncio.run(drive(router.url, workload, args.concurrency, args.max_tokens))
        wall_s = time.perf_counter() - started
        after = [scrape(server.url) for server in servers]
        replicas = [{k: v - b.get(k, 0) for k, v in a.items()} for a, b in zip(after, before)]
        return summarize(policy, records, replicas, wall_s)
    finally:
        if router is not None:
            router.stop()
        for server in servers:
            server.stop()


def table(result: dict) -> str:
    lines = [
        "| router | requests | compositions | hit rate (memory + disk) | merges | merges per composition "
        "| replicas per composition | merge s | TTFT p50 ms | TTFT p99 ms | errors | requests per replica |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"consistent_hash": "nginx `hash $composition consistent` (njs)", "round_robin": "nginx round robin"}
    for r in result["policies"]:
        lines.append(
            f"| {names[r['policy']]} | {r['num_requests']} | {r['num_compositions']} | {r['hit_rate']:.3f} "
            f"({r['memory_hit_rate']:.3f} + {r['hit_rate'] - r['memory_hit_rate']:.3f}) | {r['merges']} "
            f"| {r['merges_per_composition']:.2f} | {r['replicas_per_composition']:.2f} | {r['merge_seconds']:.1f} "
            f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['errors']} "
            f"| {'/'.join(map(str, r['requests_per_replica']))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--zipf-s", type=float, default=1.0, help="popularity of rank k is 1/k^s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-cache-bytes", type=int, default=8 << 20,
                        help="per replica; merged skill-lab compositions are 0.6-3.1 MB")
    parser.add_argument("--disk-cache-bytes", type=int, default=8 << 20, help="per replica, own directory")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    from lab.demo import ensure_demo

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # replicas share the host's cores
    workload = zipf_workload(args.num_requests, args.zipf_s, args.seed)
    with tempfile.TemporaryDirectory(prefix="loramix-routing-") as tmp:
        demo = ensure_demo(Path(tmp) / "demo", world="lab")
        policies = [run_policy(policy, workload, demo, args, Path(tmp) / policy) for policy in args.policies]
    result = {
        "bench": "routing",
        "hardware": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {platform.platform()}",
        "world": "skill lab demo (3.2M-parameter Llama, skills add/reverse/sort/upper), local engine, CPU",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "policies")},
        "num_distinct_compositions": len(compositions()),
        "policies": policies,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
