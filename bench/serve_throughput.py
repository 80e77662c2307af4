"""Serving throughput under load: loramix (local and vLLM engines) with 0, 1, 4 and 16
distinct compositions, beside vLLM's own OpenAI server serving one adapter of the same rank.

The load client is `vllm bench serve` (vLLM's OpenAI-API load generator), run against each
server with the random dataset, fixed input/output lengths (`--ignore-eos`) and bounded
concurrency. Compositions are named in the `model` field (`--lora-modules`, assigned
round-robin), exactly as any OpenAI client would name them. Every composition is merged and
registered before its run (one warm-up request each), so the numbers are serving, not merging.

    python -m bench.serve_throughput            # full: 64 requests per run
    python -m bench.serve_throughput --quick    # 16 requests per run
    python -m bench.serve_throughput --engines vllm --no-baseline

Prints one markdown table (and writes it to --out if given). Needs vLLM installed (it is the
load client and one of the engines). Loopback only; every server it starts is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "tiny"
# 16 distinct compositions of the 4 demo skills; the first is the 1-composition case.
COMPOSITIONS = [
    "math+code", "math+poetry", "code+poetry", "math+lookup", "code+lookup", "poetry+lookup",
    "math+code@lego", "math+poetry@lego", "code+poetry@lego", "math+lookup@lego",
    "code+lookup@lego", "poetry+lookup@lego",
    "math+code+poetry", "math+code+lookup", "math*0.7+code*0.3", "code*0.2+poetry*0.8",
]
MAX_LORA_RANK = 32  # >= every composition above (cat of math+code+lookup: 8 + 8 + 16)

@dataclass(frozen=True)
class Load:
    num_prompts: int
    max_concurrency: int
    input_len: int
    output_len: int


@dataclass
class Row:
    server: str
    compositions: str
    requests_per_s: float
    output_tokens_per_s: float
    mean_ttft_ms: float
    p99_ttft_ms: float
    mean_itl_ms: float
    p99_itl_ms: float


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """Offline, and on CPU hosts a 1 GiB KV cache for vLLM unless the caller set one."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return {k: v for k, v in env.items() if not k.startswith("LORAMIX_")}


class Server:
    """A server subprocess on a free loopback port; `stop()` ends it (and its children)."""

    def __init__(self, args: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, ready_s: float = 600) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            args, cwd=REPO_ROOT, env={**server_env(), **(env or {})}, stdout=self._log,
            stderr=subprocess.STDOUT
        )
        self._wait_ready(ready_s)

    def _wait_ready(self, limit_s: float = 600) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit("server exited:\n" + self.log_path.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit("server did not become ready:\n" + self.log_path.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def start_loramix(engine: str, base: Path, skills: Path, work: Path, max_loras: int) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine", engine,
        "--base-model", str(base), "--skills-dir", str(skills), "--served-model-name", BASE_NAME,
        "--cache-dir", str(work / f"cache-{engine}"), "--dtype", "float32", "--enforce-eager",
        "--max-loras", str(max_loras), "--max-cpu-loras", str(len(COMPOSITIONS)),
        "--max-lora-rank", str(MAX_LORA_RANK), "--max-batch-size", "16", "--log-level", "warning",
    ]
    return Server(args, port, work / f"loramix-{engine}.log")


def start_vllm_baseline(base: Path, adapter: Path, work: Path, max_loras: int) -> Server:
    """vLLM's own OpenAI server with one LoRA module, same settings as loramix's vLLM engine."""
    port = free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
        "--port", str(port), "--model", str(base), "--served-model-name", BASE_NAME,
        "--dtype", "float32", "--enforce-eager", "--enable-lora", "--lora-modules",
        f"adapter={adapter}", "--max-loras", str(max_loras), "--max-lora-rank", str(MAX_LORA_RANK),
        "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]
    return Server(args, port, work / "vllm-api-server.log")


def warm_up(server: Server, models: list[str]) -> None:
    """One small request per model: merges, caches and registers each composition."""
    with httpx.Client(base_url=server.url, timeout=600) as http:
        for model in models:
            response = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 1})
            if response.status_code != 200:
                raise SystemExit(f"warm-up request for {model!r} failed: {response.text}")


def run_load(
    server: Server, base: Path, models: list[str] | None, load: Load, result: Path, base_name: str = BASE_NAME
) -> dict:
    """`vllm bench serve` against `server`; the requests name `models` round-robin (or the
    base model when None). Returns vLLM's result JSON.

    Runs vLLM's bench code in this process (vllm.benchmarks.serve, what the `vllm bench
    serve` command calls): the console script fails under vllm-cpu, and one import of vLLM
    for all runs saves ~10 s per run on 2 cores."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli = [
        "--backend", "openai", "--base-url", server.url, "--model", base_name,
        "--tokenizer", str(base), "--dataset-name", "random",
        "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
        "--num-prompts", str(load.num_prompts), "--max-concurrency", str(load.max_concurrency),
        "--ignore-eos", "--seed", "0", "--disable-tqdm", "--percentile-metrics", "ttft,itl",
        "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result.parent),
        "--result-filename", result.name,
    ]
    if models:
        cli += ["--lora-modules", *models, "--lora-assignment", "round-robin"]
    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    with open(result.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(log):
        bench_serve(parser.parse_args(cli))
    data = json.loads(result.read_text())
    if data.get("completed") != load.num_prompts:
        raise SystemExit(f"only {data.get('completed')} of {load.num_prompts} requests completed")
    return data


def to_row(server: str, compositions: str, data: dict) -> Row:
    return Row(
        server=server,
        compositions=compositions,
        requests_per_s=data["request_throughput"],
        output_tokens_per_s=data["output_throughput"],
        mean_ttft_ms=data["mean_ttft_ms"],
        p99_ttft_ms=data["p99_ttft_ms"],
        mean_itl_ms=data["mean_itl_ms"],
        p99_itl_ms=data["p99_itl_ms"],
    )


def bench_loramix(engine: str, base: Path, skills: Path, work: Path, load: Load, max_loras: int) -> list[Row]:
    server = start_loramix(engine, base, skills, work, max_loras)
    try:
        warm_up(server, [BASE_NAME, *COMPOSITIONS])
        rows = []
        for count in (0, 1, 4, 16):
            models = COMPOSITIONS[:count] or None
            data = run_load(server, base, models, load, work / f"{engine}-{count}.json")
            rows.append(to_row(f"loramix ({engine} engine)", str(count) if count else "base model", data))
        return rows
    finally:
        server.stop()


def bench_vllm_baseline(base: Path, skills: Path, work: Path, load: Load, max_loras: int) -> list[Row]:
    """vLLM serving the base model and one adapter: the 1-composition case, merged offline."""
    import merging

    skills_used = [merging.load_adapter(skills / name) for name in ("math", "code")]
    adapter = work / "math+code"
    merging.merge(skills_used, method="cat").adapter.save(adapter)  # = COMPOSITIONS[0]
    server = start_vllm_baseline(base, adapter, work, max_loras)
    try:
        warm_up(server, [BASE_NAME, "adapter"])
        rows = []
        for models, label in ((None, "base model"), (["adapter"], "1 (one static adapter)")):
            data = run_load(server, base, models, load, work / f"vllm-server-{label[:4]}.json")
            rows.append(to_row("vLLM OpenAI server", label, data))
        return rows
    finally:
        server.stop()


def markdown(rows: list[Row], load: Load) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Serving throughput, tiny fp32 Llama (hidden 128, 2 layers), {os.cpu_count()} CPU cores ({cpu}); "
        f"`vllm bench serve`, random prompts, {load.num_prompts} requests per run, "
        f"input {load.input_len} / output {load.output_len} tokens, concurrency {load.max_concurrency}.",
        "",
        "| server | compositions | req/s | output tok/s | TTFT mean ms | TTFT p99 ms | ITL mean ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.server} | {r.compositions} | {r.requests_per_s:.2f} | {r.output_tokens_per_s:.1f} | "
            f"{r.mean_ttft_ms:.1f} | {r.p99_ttft_ms:.1f} | {r.mean_itl_ms:.1f} | {r.p99_itl_ms:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 requests per run instead of 64")
    parser.add_argument("--engines", nargs="+", default=["local", "vllm"], choices=["local", "vllm"])
    parser.add_argument("--no-baseline", action="store_true", help="skip vLLM's own OpenAI server")
    parser.add_argument("--max-loras", type=int, default=8, help="adapter slots (both engines, baseline)")
    parser.add_argument("--concurrency", type=int, default=None, help="default: 16 (quick: 8)")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    load = Load(
        num_prompts=16 if args.quick else 64,
        max_concurrency=args.concurrency or (8 if args.quick else 16),
        input_len=32,
        output_len=16 if args.quick else 32,
    )
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="loramix-serve-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    from lab.demo import ensure_demo

    demo = ensure_demo(work / "demo", world="tiny")  # the compositions below name its skills
    rows: list[Row] = []
    for engine in args.engines:
        print(f"loramix, {engine} engine ...", file=sys.stderr, flush=True)
        rows += bench_loramix(engine, demo.base_dir, demo.skills_dir, work, load, args.max_loras)
    if not args.no_baseline:
        print("vLLM OpenAI server ...", file=sys.stderr, flush=True)
        rows += bench_vllm_baseline(demo.base_dir, demo.skills_dir, work, load, args.max_loras)
    table = markdown(rows, load)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
