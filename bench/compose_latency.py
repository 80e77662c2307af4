"""Request latency by composition state: base model vs a cached composition vs a NEW one.

Starts the real server (`python -m server.cli serve`, demo model, fresh composition cache) in
a subprocess and sends /v1/completions requests with max_tokens=1 over one keep-alive HTTP
connection, interleaving the three kinds so drift hits all equally:

  base     model = the base model (no adapter)
  cached   model = "reverse+upper" (merged once during warm-up)
  cold     model = a composition never seen before (weights differ each time): merge + save
           + engine registration + the request

The "compose ms" column is the server's own time to resolve the composition and pin its
adapter (its Server-Timing header); the rest of the difference to base is the engine
running the LoRA adapter.

    python -m bench.compose_latency                 # 30 rounds, local engine
    python -m bench.compose_latency --rounds 50 --method lego --out results.json

Target: cached-composition overhead over base under 5 ms per request (median).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "loramix-demo"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(work: Path, engine: str, port: int) -> subprocess.Popen:
    """`loramix serve` on the demo model with a fresh cache; returns once /health answers."""
    args = [
        sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine", engine,
        "--demo", "lab", "--demo-dir", str(work / "demo"), "--cache-dir", str(work / "cache"), "--log-level", "warning",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("server exited:\n" + (work / "server.log").read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("server did not start")


def describe_host() -> str:
    """CPU count, Python, and the accelerator the local engine will pick (if any)."""
    host = f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    try:
        import torch

        if torch.cuda.is_available():
            host += f", {torch.cuda.get_device_name()} (torch {torch.__version__})"
    except ImportError:
        pass
    return host


def timed_request(client: httpx.Client, model: str) -> tuple[float, float]:
    """(seconds for one max_tokens=1 completion, server-side compose seconds from its
    Server-Timing header). Raises on a non-200 answer."""
    started = time.perf_counter()
    response = client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    compose_ms = float(response.headers["server-timing"].split("dur=")[1])
    return elapsed, compose_ms / 1e3


def measure(client: httpx.Client, rounds: int, method: str) -> tuple[dict, dict]:
    """Per kind: end-to-end request seconds and server-side compose seconds."""
    cached = f"reverse+upper@{method}"
    for _ in range(3):  # warm-up: merges `cached`, loads code paths
        timed_request(client, BASE_NAME)
        timed_request(client, cached)
    times: dict[str, list[float]] = {"base": [], "cached": [], "cold": []}
    compose: dict[str, list[float]] = {"base": [], "cached": [], "cold": []}
    for i in range(rounds):
        weight = 0.5 + (i + 1) * 1e-4  # a new composition (new key) every round
        models = {"base": BASE_NAME, "cached": cached, "cold": f"reverse*{weight}+upper*{1 - weight}@{method}"}
        for kind, model in models.items():
            total, server_compose = timed_request(client, model)
            times[kind].append(total)
            compose[kind].append(server_compose)
    return times, compose


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    summary = {}
    for kind, values in times.items():
        ordered = sorted(values)
        summary[kind] = {
            "median_ms": 1e3 * statistics.median(ordered),
            "p90_ms": 1e3 * ordered[int(0.9 * (len(ordered) - 1))],
            "min_ms": 1e3 * ordered[0],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--method", default="cat")
    parser.add_argument("--engine", default="local", choices=["local", "vllm", "auto"])
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loramix-bench-") as tmp:
        port = free_port()
        server = start_server(Path(tmp), args.engine, port)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
                times, compose = measure(client, args.rounds, args.method)
        finally:
            server.terminate()
            server.wait(timeout=60)

    summary = summarize(times)
    overhead = summary["cached"]["median_ms"] - summary["base"]["median_ms"]
    print(f"compose latency: {args.rounds} rounds, max_tokens=1, engine={args.engine}, method={args.method}")
    print(f"host: {describe_host()}")
    compose_ms = {kind: 1e3 * statistics.median(values) for kind, values in compose.items()}
    print(f"{'request':<28}{'median ms':>12}{'p90 ms':>12}{'min ms':>12}{'compose ms':>12}")
    labels = {"base": "base model (baseline)", "cached": "cached composition", "cold": "new composition (merge)"}
    for kind, label in labels.items():
        row = summary[kind]
        print(f"{label:<28}{row['median_ms']:>12.2f}{row['p90_ms']:>12.2f}{row['min_ms']:>12.2f}{compose_ms[kind]:>12.3f}")
    verdict = "meets" if overhead < 5 else "MISSES"
    print(f"cached overhead over base: {overhead:+.2f} ms (median) -> {verdict} the < 5 ms target")
    print(f"  of which composition lookup (server-side, median): "
          f"{compose_ms['cached'] - compose_ms['base']:+.3f} ms; the rest is the engine running the adapter")
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "summary": summary,
                                        "compose_median_ms": compose_ms, "cached_overhead_ms": overhead,
                                        "times_s": times}, indent=1))


if __name__ == "__main__":
    main()
