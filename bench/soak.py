"""Soak bench: the real server under a few minutes of mixed, impatient and hostile load.

Starts `loramix serve` (tiny demo model, local engine by default) on a free loopback port and
drives --clients concurrent clients (bench/soak_load.py) for --duration seconds: streaming and
non-streaming requests on the base model, single skills and cached compositions; compositions
never seen before (random weights, some of 3-4 skills); clients that disconnect mid-stream or
before a non-streamed answer; and a trickle of hostile requests that must get their 4xx.
The memory and disk tiers are kept small so that eviction runs all the time.

Target: 0 errors (no 5xx, no unexpected status, no stream ending without finish_reason) and a
flat server RSS after warm-up (sampled from /proc every --rss-every seconds): a least-squares
slope of at most FLAT_SLOPE_MIB_PER_MIN over the samples after the first --warmup-fraction.
The machine's load average is recorded beside it (latencies depend on it).
--heap-trace-every runs the server under bench/heap_trace.py (tracemalloc) to find what grows.

    python -m bench.soak                      # 32 clients, 180 s, local engine
    python -m bench.soak --duration 30 --out /tmp/soak.json
    python -m bench.soak --engine vllm
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.serve_throughput import Server, free_port
from bench.soak_load import Tally, drive

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "soak_cpu.json"
# "RSS flat": the least-squares slope of the RSS samples after warm-up (the first
# --warmup-fraction of the run: model load, first merges, caches filling to their bounds) is
# at most this many MiB per minute. Over a 10-minute run that bounds the drift after warm-up to
# 7.5 MiB, about 1% of the server's RSS; a leak of a few KiB per request (7 KiB per adapter
# load was the last one found) exceeds it at this bench's request rate.
FLAT_SLOPE_MIB_PER_MIN = 1.0


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` in MiB, from /proc (no psutil needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Samples a process's RSS every `every_s` seconds, and the machine's 1-minute load
    average with it: samples [(seconds since start, MiB)], loads [load average]."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self.loads: list[float] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> None:
        self.samples.append((time.monotonic() - self._t0, rss_mib(self.pid)))
        self.loads.append(os.getloadavg()[0])

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every_s)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        self.sample()
        return self.samples


def slope_mib_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute."""
    if len(samples) < 2:
        return 0.0
    times, values = zip(*samples)
    return statistics.linear_regression(times, values).slope * 60


def per_1000_requests_kib(slope_mib_per_min: float, num_requests: int, wall_s: float) -> float:
    """An RSS slope as KiB per 1,000 requests at the run's mean request rate: a leak per request
    shows the same number on a loaded and an idle machine, a slope per minute does not."""
    requests_per_min = num_requests / wall_s * 60
    return slope_mib_per_min * 1024 / requests_per_min * 1000 if requests_per_min else 0.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(args, work: Path) -> Server:
    from lab.demo import ensure_demo

    demo = ensure_demo(args.demo_dir or work / "demo", world="tiny")
    port = free_port()
    launcher = [sys.executable, "-m", "server.cli"]
    if args.heap_trace_every:
        launcher = [sys.executable, "-m", "bench.heap_trace", "--every", str(args.heap_trace_every),
                    "--ready-url", f"http://127.0.0.1:{port}/health", "--warmup", "30", "--out", str(work), "--"]
    cmd = [
        *launcher, "serve", "--port", str(port), "--engine", args.engine,
        "--base-model", str(demo.base_dir), "--skills-dir", str(demo.skills_dir), "--served-model-name", "tiny",
        "--cache-dir", str(work / "cache"), "--memory-cache-bytes", str(args.memory_cache_bytes),
        "--disk-cache-bytes", str(args.disk_cache_bytes), "--disk-cache-grace-seconds", str(args.disk_grace), "--max-request-bytes", str(args.max_request_bytes),
        "--max-lora-rank", "32", "--dtype", "float32", "--log-level", "warning",
    ]
    return Server(cmd, port, work / "server.log")


def summarize(args, tally: Tally, sampler: RssSampler, wall_s: float) -> dict:
    samples = sampler.samples
    warm = [(t, v) for t, v in samples if t >= args.warmup_fraction * samples[-1][0]]
    second_half = [(t, v) for t, v in samples if t >= 0.5 * samples[-1][0]]
    slope = slope_mib_per_min(warm)
    num_errors = sum(tally.errors.values())
    return {
        "hardware": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared",
        "engine": args.engine,
        "clients": args.clients,
        "duration_s": round(wall_s, 1),
        "max_tokens": args.max_tokens,
        "requests": sum(tally.requests.values()),
        "requests_by_behaviour": dict(tally.requests),
        "outcomes": dict(tally.outcomes),
        "new_compositions_requested": tally.new_compositions,
        "errors": num_errors,
        "errors_by_kind": dict(tally.errors),
        "error_examples": tally.error_examples,
        "ttft_p50_ms": _ms(percentile(tally.ttft_s, 50)),
        "ttft_p99_ms": _ms(percentile(tally.ttft_s, 99)),
        "completion_tokens": tally.completion_tokens,
        "tokens_per_s": round(tally.completion_tokens / wall_s, 1),
        "rss_mib": {"start": round(samples[0][1], 1), "middle": round(samples[len(samples) // 2][1], 1),
                    "end": round(samples[-1][1], 1), "max": round(max(v for _, v in samples), 1)},
        "rss_slope_after_warmup_mib_per_min": round(slope, 2),
        "rss_slope_second_half_mib_per_min": round(slope_mib_per_min(second_half), 2),
        "rss_growth_after_warmup_mib": round(warm[-1][1] - warm[0][1], 1),
        "rss_slope_per_1000_requests_kib": round(per_1000_requests_kib(slope, sum(tally.requests.values()), wall_s), 1),
        "load_average_1min": {"min": round(min(sampler.loads), 1), "median": round(statistics.median(sampler.loads), 1),
                              "max": round(max(sampler.loads), 1)},
        "rss_samples": [(round(t, 1), round(v, 1)) for t, v in samples],
        "target_met": num_errors == 0 and slope <= FLAT_SLOPE_MIB_PER_MIN,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def table(result: dict) -> str:
    rss = result["rss_mib"]
    rows = [
        ("hardware", result["hardware"]),
        ("engine / clients / duration", f"{result['engine']} / {result['clients']} / {result['duration_s']} s"),
        ("requests", result["requests"]),
        ("new compositions requested", result["new_compositions_requested"]),
        ("outcomes", ", ".join(f"{k}: {v}" for k, v in sorted(result["outcomes"].items()))),
        ("errors (target 0)", f"{result['errors']} {result['errors_by_kind'] or ''}".strip()),
        ("TTFT p50 / p99", f"{result['ttft_p50_ms']} / {result['ttft_p99_ms']} ms"),
        ("output tokens/s", result["tokens_per_s"]),
        ("RSS start / middle / end / max", f"{rss['start']} / {rss['middle']} / {rss['end']} / {rss['max']} MiB"),
        (f"RSS slope after warm-up (target <= {FLAT_SLOPE_MIB_PER_MIN})",
         f"{result['rss_slope_after_warmup_mib_per_min']} MiB/min"),
        ("RSS slope over the second half", f"{result['rss_slope_second_half_mib_per_min']} MiB/min"),
        ("RSS growth after warm-up", f"{result['rss_growth_after_warmup_mib']} MiB"),
        ("RSS slope per 1,000 requests", f"{result['rss_slope_per_1000_requests_kib']} KiB"),
        ("load average (1 min) min / median / max", "{min} / {median} / {max}".format(**result["load_average_1min"])),
        ("target met (0 errors, RSS flat)", "yes" if result["target_met"] else "NO"),
    ]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default="local", choices=["local", "vllm"])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=180, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--rss-every", type=float, default=3, help="seconds between RSS samples")
    parser.add_argument("--warmup-fraction", type=float, default=0.25,
                        help="share of the run left out of the RSS slope")
    parser.add_argument("--memory-cache-bytes", type=int, default=4 * 2**20, help="server's memory tier")
    parser.add_argument("--disk-cache-bytes", type=int, default=16 * 2**20, help="server's disk tier")
    parser.add_argument("--disk-grace", type=float, default=5,
                        help="server's --disk-cache-grace-seconds (short, so disk eviction runs)")
    parser.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="server's body limit")
    parser.add_argument("--heap-trace-every", type=float, default=0,
                        help="run the server under tracemalloc (bench/heap_trace.py), a snapshot every this many "
                             "seconds, written to the work dir's heap_trace.json (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-dir", type=Path, default=None, help="tiny demo world (default: built in the work dir)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="result JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loramix-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    server = start_server(args, work)
    try:
        sampler = RssSampler(server.process.pid, args.rss_every)
        sampler.start()
        started = time.monotonic()
        tally = asyncio.run(drive(server.url, num_clients=args.clients, duration_s=args.duration,
                                  max_tokens=args.max_tokens, max_request_bytes=args.max_request_bytes,
                                  seed=args.seed))
        wall_s = time.monotonic() - started
        sampler.stop()
        if server.process.poll() is not None:
            tally.error("server_exited", f"exit status {server.process.returncode}")
    finally:
        server.stop()
    result = summarize(args, tally, sampler, wall_s)
    print(table(result))
    for example in result["error_examples"]:
        print("  error:", example)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
