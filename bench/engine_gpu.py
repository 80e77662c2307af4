"""End-to-end decode throughput of the local engine on a GPU, against transformers + peft.

Run on a CUDA GPU (one H200 here):
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 bench/engine_gpu.py --out $OUT/engine_gpu.json
Builds everything locally (no model hub): a Llama-1B-shaped model with random weights (hidden
2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000, bf16) saved with
save_pretrained, a word-level tokenizer, and 8 random rank-16 adapters on all seven projections
with non-zero lora_b. Then measures, with the same random prompts (32 requests, 128 prompt
tokens, 128 new tokens, greedy, EOS ignored), each after a warm-up:
  1. LocalEngine, base model only, 32 requests in flight at once;
  2. LocalEngine, the same 32 requests over 8 adapters (4 each), all in flight at once;
  (1 and 2 for each engine mode of --modes: decode replayed from CUDA graphs over a static
  KV cache, the static cache launched eagerly, the dynamic cache launched eagerly; in graphs
  mode the warm-up's first 64 replays are also run eagerly on the same inputs and the largest
  logit difference is reported: 0 means the graphs replay exactly the eager computation);
  3. transformers `generate` of the base model, batch 32;
  4. transformers + peft `generate` with all 8 adapters loaded and `adapter_names` per row
     (peft's mixed-batch inference), batch 32.
Output tokens/s and the LoRA overhead (throughput lost, mixed vs base) for loramix and peft.
Prints a markdown table and writes JSON. `--tiny` runs a tiny model on CPU (checks the script).
Imports only what LocalEngine needs (no FastAPI, vLLM or pydantic-settings).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROJECTIONS = {  # name -> (in_features, out_features) as functions of the model config
    "q_proj": lambda c: (c["hidden"], c["heads"] * c["head_dim"]),
    "k_proj": lambda c: (c["hidden"], c["kv_heads"] * c["head_dim"]),
    "v_proj": lambda c: (c["hidden"], c["kv_heads"] * c["head_dim"]),
    "o_proj": lambda c: (c["heads"] * c["head_dim"], c["hidden"]),
    "gate_proj": lambda c: (c["hidden"], c["intermediate"]),
    "up_proj": lambda c: (c["hidden"], c["intermediate"]),
    "down_proj": lambda c: (c["intermediate"], c["hidden"]),
}
# LocalEngine options of each mode compared (--modes); the first is the headline figure.
MODES = {
    "graphs": {"kv_cache": "static"},  # static KV cache, decode replayed from CUDA graphs
    "eager": {"kv_cache": "static", "enforce_eager": True},  # the same, launched eagerly
    "dynamic": {"kv_cache": "dynamic"},  # DynamicCache, eager (the engine before graphs)
}
MODE_LABELS = {"graphs": "CUDA graphs", "eager": "static KV, eager",
               "dynamic": "dynamic KV, eager"}
FULL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000,
            dtype="bfloat16", device="cuda", requests=32, prompt=128, new_tokens=128)
TINY = dict(hidden=128, layers=2, heads=2, kv_heads=1, intermediate=256, vocab=1000,
            dtype="float32", device="cpu", requests=32, prompt=16, new_tokens=8)
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>")


# ---------------------------------------------------------------- building the model
def build_tokenizer(vocab: int):
    """A word-level tokenizer whose vocabulary is exactly `vocab` ids (t4 ... t{vocab-1}), so
    every random prompt id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {tok: i for i, tok in enumerate(SPECIAL)}
    words.update({f"t{i}": i for i in range(len(SPECIAL), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def build_base(out: Path, cfg: dict, seed: int = 0) -> Path:
    """Random LlamaForCausalLM of the configured shape (initialised on the target device),
    saved in the configured dtype with its tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
        num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"], head_dim=cfg["head_dim"],
        max_position_embeddings=2048, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(cfg["device"]):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, cfg["dtype"]))
    model.generation_config = GenerationConfig(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model.save_pretrained(out)
    build_tokenizer(cfg["vocab"]).save_pretrained(out)
    del model
    return out


def build_adapters(root: Path, cfg: dict, count: int, rank: int, seed: int = 1) -> list[Path]:
    """`count` random PEFT adapters of rank `rank` on every projection of every layer:
    lora_a ~ N(0, 1/in), lora_b ~ N(0, 0.02²) (non-zero, so each adapter changes the output)."""
    from merging import LoraAdapter, LoraModule

    dtype = getattr(torch, cfg["dtype"])
    paths = []
    for index in range(count):
        gen = torch.Generator().manual_seed(seed + index)
        modules = {}
        for layer in range(cfg["layers"]):
            for name, dims in PROJECTIONS.items():
                n_in, n_out = dims(cfg)
                part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                modules[f"model.layers.{layer}.{part}.{name}"] = LoraModule(
                    lora_a=torch.randn(rank, n_in, generator=gen) / n_in ** 0.5,
                    lora_b=torch.randn(n_out, rank, generator=gen) * 0.02)
        adapter = LoraAdapter(modules, base_model="bench-llama", dtype=dtype)
        paths.append(adapter.save(root / f"skill{index}"))
    return paths


# ---------------------------------------------------------------- timing helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summary(runs: list[dict]) -> dict:
    """Median tokens/s over the timed runs, with every run kept."""
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs), "runs": runs}


# ---------------------------------------------------------------- loramix LocalEngine
async def engine_batch(engine, prompts, handles, new_tokens, tag, device) -> dict:
    """Submit every request at once (row i uses handles[i]); time until all have finished."""
    from server.engines.base import SamplingOptions

    sampling = SamplingOptions(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i):
        tokens = []
        async for delta in engine.generate(f"{tag}-{i}", prompts[i], sampling, handles[i]):
            tokens.extend(delta.token_ids)
        return tokens

    passes_before = engine.health()["num_forward_passes"]
    sync(device)
    start = time.perf_counter()
    outputs = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o) for o in outputs)
    if any(len(o) != new_tokens for o in outputs):
        raise RuntimeError(f"{tag}: a request returned {sorted({len(o) for o in outputs})} "
                           f"tokens, expected {new_tokens}")
    passes = engine.health()["num_forward_passes"] - passes_before
    return {"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
            "forward_passes": passes, "ms_per_pass": 1e3 * seconds / passes,
            "outputs": outputs}


async def profile_engine(engine, prompts, rows_by_kind, new_tokens, device, top: int) -> dict:
    """cProfile of the engine's worker thread (where every forward pass runs) over one batch of
    each kind: the Python functions with the most own time, to find where the host spends a
    mixed pass that a base pass does not. cProfile slows Python down; read it as shares."""
    import cProfile
    import io
    import pstats

    loop = asyncio.get_running_loop()
    worker = engine._executor  # the single thread that runs the model (see LocalEngine)
    tables = {}
    for kind, rows in rows_by_kind.items():
        profiler = cProfile.Profile()
        await loop.run_in_executor(worker, profiler.enable)
        run = await engine_batch(engine, prompts, rows, new_tokens, f"prof-{kind}", device)
        await loop.run_in_executor(worker, profiler.disable)
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
        stats.print_stats(top)
        total = sum(entry[2] for entry in stats.stats.values())
        print(f"\n== profile: {kind}, {run['forward_passes']} passes, {run['ms_per_pass']:.2f} ms/pass "
              f"(profiled), {1e3 * total / max(run['forward_passes'], 1):.2f} ms of Python per pass ==\n"
              + stream.getvalue(), flush=True)
        ranked = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
        tables[kind] = {
            "ms_per_pass": run["ms_per_pass"], "passes": run["forward_passes"],
            "top_tottime_ms_per_pass": [
                {"function": f"{path}:{line}({name})", "calls": calls,
                 "ms_per_pass": 1e3 * tottime / max(run["forward_passes"], 1)}
                for (path, line, name), (_, calls, tottime, _, _) in ranked],
        }
    return tables


def check_replays(engine, limit: int) -> list[tuple[float, float]]:
    """Make the engine's first `limit` graph replays also run the same forward eagerly, twice,
    on the same inputs (the forward is idempotent for them) and record (max |replay - eager|,
    max |eager - eager again|) of the logits: 0.0 means bitwise the same; the second is the
    run-to-run noise floor of the eager computation itself."""
    decoder = engine._runner.decoder
    replay, diffs = decoder._replay, []

    def checked(rows, width, is_lora):
        logits = replay(rows, width, is_lora).clone()
        if len(diffs) < limit:
            first, second = decoder._forward(rows, width), decoder._forward(rows, width)
            diffs.append((float((logits - first).abs().max()),
                          float((first - second).abs().max())))
        return logits

    decoder._replay = checked
    return diffs


def time_replays(engine, device: str, count: int = 50) -> dict[str, float]:
    """GPU time of one replay of each captured decode graph (ms, mean of `count` back-to-back
    replays between CUDA events), with the engine idle: the pass's device time without the
    host's per-step work (input copies, sampling, detokenizing, streaming)."""
    times = {}
    for (rows, width, is_lora), (graph, _) in sorted(engine._runner.decoder.graphs.items()):
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            graph.replay()
        end.record()
        sync(device)
        label = f"{rows} rows x {width} columns, {'LoRA' if is_lora else 'base'}"
        times[label] = start.elapsed_time(end) / count
        print(f"  graph replay {label}: {times[label]:.3f} ms", flush=True)
    return times


async def bench_engine(base_dir, adapter_dirs, prompts, cfg, repeats, deadline,
                       profile_top: int = 0, options: dict | None = None) -> dict:
    from server.engines.base import AdapterHandle
    from server.engines.local import LocalEngine

    engine = LocalEngine(base_dir, max_loras=len(adapter_dirs), max_lora_rank=cfg["rank"],
                         dtype=cfg["dtype"], device=cfg["device"],
                         max_batch_size=cfg["requests"], **(options or {}))
    await engine.start()
    diffs = check_replays(engine, 64) if engine.cuda_graphs else []
    handles = [AdapterHandle(i + 1, f"skill{i}", path, rank=cfg["rank"])
               for i, path in enumerate(adapter_dirs)]
    for handle in handles:
        await engine.add_adapter(handle)
    per_row = len(prompts) // len(handles)
    mixed = [handles[i // per_row] for i in range(len(prompts))]
    base = [None] * len(prompts)
    new = cfg["new_tokens"]
    # Warm-up at the timed lengths: Triton compiles the prefill and decode kernels, the
    # adapters enter their slots, and attention meets every KV length once. (A warm-up of 8
    # new tokens was not enough on the H200: the first full-length run was 3x slower.)
    t = time.perf_counter()
    await engine_batch(engine, prompts, mixed, new, "warm-mixed", cfg["device"])
    await engine_batch(engine, prompts, base, new, "warm-base", cfg["device"])
    health = engine.health()
    print(f"  engine warm-up {time.perf_counter() - t:.1f} s ({health['kv_cache']} KV cache, "
          f"{health['num_cuda_graphs']} CUDA graphs)", flush=True)
    if engine.cuda_graphs:
        del engine._runner.decoder._replay  # timed runs replay without the check
        print(f"  graph replay vs eager, {len(diffs)} steps: max |logit diff| "
              f"{max((d[0] for d in diffs), default=float('nan')):.3g} (eager vs eager: "
              f"{max((d[1] for d in diffs), default=float('nan')):.3g})", flush=True)
    if profile_top:
        tables = await profile_engine(engine, prompts, {"base": base, "mixed": mixed},
                                      min(new, 32), cfg["device"], profile_top)
        await engine.shutdown()
        return {"profile": tables}
    results = {"base": [], "mixed": []}
    for rep in range(repeats):
        if rep and time.monotonic() > deadline:
            print("  time budget reached: fewer repeats", flush=True)
            break
        for kind, rows in (("base", base), ("mixed", mixed)):
            run = await engine_batch(engine, prompts, rows, new, f"{kind}{rep}", cfg["device"])
            print(f"  loramix {kind:5s} run {rep}: {run['tokens_per_s']:8.1f} tok/s "
                  f"({run['seconds']:.2f} s, {run['forward_passes']} passes, "
                  f"{run['ms_per_pass']:.2f} ms/pass)", flush=True)
            results[kind].append(run)
    health = engine.health()
    replay_ms = time_replays(engine, cfg["device"]) if engine.cuda_graphs else {}
    await engine.shutdown()
    outputs = {k: v[-1].pop("outputs") for k, v in results.items()}
    for runs in results.values():
        for run in runs:
            run.pop("outputs", None)
    return {"base": summary(results["base"]), "mixed": summary(results["mixed"]),
            "options": options or {}, "kv_cache": health["kv_cache"],
            "cuda_graphs": health["cuda_graphs"], "num_cuda_graphs": health["num_cuda_graphs"],
            "replay_vs_eager_max_abs_diff": max(d[0] for d in diffs) if diffs else None,
            "eager_vs_eager_max_abs_diff": max(d[1] for d in diffs) if diffs else None,
            "graph_replay_ms": replay_ms,
            "replay_checks": len(diffs),
            "max_adapters_per_pass": health["max_adapters_per_pass"],
            "adapter_loads": health["adapter_loads"], "outputs": outputs}


# ---------------------------------------------------------------- transformers (+ peft)
def hf_batch(model, input_ids, new_tokens, device, **kwargs) -> dict:
    """One batched greedy `generate` of exactly `new_tokens` tokens per row."""
    mask = torch.ones_like(input_ids)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    generated = out[:, input_ids.shape[1]:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {generated.shape[1]} tokens per row, "
                           f"expected {new_tokens}")
    produced = generated.numel()
    return {"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
            "outputs": generated.tolist()}


def hf_runs(model, input_ids, new_tokens, device, repeats, deadline, label, warmup_tokens,
            **kwargs):
    hf_batch(model, input_ids, warmup_tokens, device, **kwargs)  # warm-up
    runs = []
    for rep in range(repeats):
        if rep and time.monotonic() > deadline:
            print("  time budget reached: fewer repeats", flush=True)
            break
        run = hf_batch(model, input_ids, new_tokens, device, **kwargs)
        print(f"  {label} run {rep}: {run['tokens_per_s']:8.1f} tok/s ({run['seconds']:.2f} s)",
              flush=True)
        runs.append(run)
    outputs = runs[-1]["outputs"]
    for run in runs:
        run.pop("outputs")
    return summary(runs), outputs


def bench_hf(base_dir, adapter_dirs, prompts, cfg, repeats, peft_repeats, deadline) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = cfg["device"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, cfg["dtype"]))
    model.to(device).eval()
    input_ids = torch.tensor(prompts, device=device)
    base, base_out = hf_runs(model, input_ids, cfg["new_tokens"], device, repeats, deadline,
                             "transformers base ", cfg["new_tokens"])
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="skill0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"skill{i}")
    peft_model.eval()
    per_row = len(prompts) // len(adapter_dirs)
    names = [f"skill{i // per_row}" for i in range(len(prompts))]
    mixed, mixed_out = hf_runs(peft_model, input_ids, cfg["new_tokens"], device, peft_repeats,
                               deadline, "peft mixed        ",
                               # Short: the base runs above already met every KV length, and
                               # a full-length peft run takes over 20 s on the H200.
                               min(8, cfg["new_tokens"]), adapter_names=names)
    del peft_model, model
    return {"base": base, "mixed": mixed, "outputs": {"base": base_out, "mixed": mixed_out}}


# ---------------------------------------------------------------- report
def overhead(base: dict, mixed: dict) -> float:
    """Throughput lost to LoRA, in percent of the base model's tokens/s."""
    return 100.0 * (1.0 - mixed["tokens_per_s"] / base["tokens_per_s"])


def same_rows(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def render(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ours, hf = result["loramix"], result["transformers"]
    shape = (f"hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
             f"{cfg['kv_heads']} KV heads, intermediate {cfg['intermediate']}, "
             f"vocab {cfg['vocab']}, {cfg['dtype']}")
    lines = [
        f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, triton {env['triton']}; LocalEngine kernel backend "
        f"`{env['kernel_backend']}`. Random Llama-1B-shaped model ({shape}); "
        f"{cfg['requests']} requests, prompt {cfg['prompt']} tokens, {cfg['new_tokens']} new "
        f"tokens, greedy, EOS ignored; {cfg['adapters']} random rank-{cfg['rank']} adapters on "
        f"all seven projections ({cfg['requests'] // cfg['adapters']} requests each). "
        "Median of the timed runs after a warm-up.",
        "",
        "| system | batch | output tok/s (median) | timed runs, tok/s | LoRA overhead (tok/s lost vs base) |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for mode, run in result.get("loramix_modes", {result.get("mode", "eager"): ours}).items():
        system = f"loramix LocalEngine, {MODE_LABELS.get(mode, mode)}"
        rows += [(system, "base model only", run["base"], None),
                 (system, f"{cfg['adapters']} adapters mixed", run["mixed"],
                  overhead(run["base"], run["mixed"]))]
    rows += [
        ("transformers `generate`", "base model only", hf["base"], None),
        ("transformers + peft `generate` (`adapter_names`)", f"{cfg['adapters']} adapters mixed",
         hf["mixed"], result["overhead_percent"]["peft"]),
    ]
    for system, batch, stats, lost in rows:
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in stats["runs"])
        cell = "" if lost is None else f"**−{lost:.1f}%**" if lost >= 0 else f"+{-lost:.1f}%"
        lines.append(f"| {system} | {batch} | {stats['tokens_per_s']:,.0f} | {runs} | {cell} |")
    return "\n".join(lines)


def environment(cfg: dict) -> dict:
    import peft
    import transformers

    from kernels import backend_for

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device = cfg["device"]
    gpu = (torch.cuda.get_device_name(0) if device.startswith("cuda")
           else f"CPU ({platform.machine()}, {os.cpu_count()} cores)")
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "triton": triton_version, "python": platform.python_version(),
            "kernel_backend": backend_for(torch.empty(1, device=device))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (script check)")
    parser.add_argument("--device", help="override the device (e.g. --tiny --device cuda: "
                        "the tiny float32 model on the GPU, where the modes must agree)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (loramix, base HF)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="timed runs of peft mixed")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="after this many seconds, stop starting extra repeats")
    parser.add_argument("--modes", default="graphs,eager,dynamic",
                        help=f"comma-separated engine modes to time, of {sorted(MODES)}")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="instead of timing: profile one base and one mixed batch of the "
                             "engine (32 new tokens) and print the TOP ops by self CPU time")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must name some of {sorted(MODES)}")
    cfg = dict(TINY if args.tiny else FULL, adapters=args.adapters, rank=args.rank)
    cfg["head_dim"] = cfg["hidden"] // cfg["heads"]
    if args.device:
        cfg["device"] = args.device
    if cfg["requests"] % cfg["adapters"]:
        parser.error("the number of requests must be a multiple of --adapters")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    env = environment(cfg)
    print(json.dumps(env), flush=True)
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(len(SPECIAL), cfg["vocab"], (cfg["requests"], cfg["prompt"]),
                            generator=gen).tolist()
    with tempfile.TemporaryDirectory(prefix="loramix-engine-bench-") as tmp:
        t = time.perf_counter()
        base_dir = build_base(Path(tmp) / "base", cfg)
        adapter_dirs = build_adapters(Path(tmp) / "skills", cfg, cfg["adapters"], cfg["rank"])
        gc.collect()
        print(f"built model and {len(adapter_dirs)} adapters in {time.perf_counter() - t:.1f} s",
              flush=True)
        by_mode = {}
        for mode in modes:
            print(f"loramix LocalEngine, mode {mode}: {MODES[mode]}", flush=True)
            by_mode[mode] = asyncio.run(bench_engine(base_dir, adapter_dirs, prompts, cfg,
                                                     args.repeats, deadline, args.profile,
                                                     MODES[mode]))
            if args.profile:
                continue
            # Kept in case the baselines do not finish inside the device lease.
            write(args.out, {"environment": env, "config": cfg, "partial": True, "loramix_modes": {
                m: {k: v for k, v in r.items() if k != "outputs"} for m, r in by_mode.items()}})
            gc.collect()
        if args.profile:
            write(args.out, {"environment": env, "config": cfg, "modes": by_mode})
            return
        ours = by_mode[modes[0]]
        gc.collect()
        if cfg["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        hf = bench_hf(base_dir, adapter_dirs, prompts, cfg, args.repeats, args.peft_repeats,
                      deadline)
    outputs = {mode: run.pop("outputs") for mode, run in by_mode.items()}
    ours_out, hf_out = outputs[modes[0]], hf.pop("outputs")
    result = {
        "environment": env,
        "config": cfg,
        "mode": modes[0],
        "loramix": ours,
        "loramix_modes": by_mode,
        "transformers": hf,
        "overhead_percent": {"loramix": overhead(ours["base"], ours["mixed"]),
                             "peft": overhead(hf["base"], hf["mixed"]),
                             **{f"loramix_{m}": overhead(r["base"], r["mixed"])
                                for m, r in by_mode.items()}},
        # Checks, not speed: adapters change every row; bf16 batched greedy decoding may
        # legitimately drift between implementations, so agreement is reported, not required.
        "checks": {
            "rows": cfg["requests"],
            "loramix_mixed_rows_differing_from_base": cfg["requests"] - same_rows(
                ours_out["mixed"], ours_out["base"]),
            "loramix_vs_transformers_base_rows_identical": same_rows(ours_out["base"],
                                                                     hf_out["base"]),
            "loramix_vs_peft_mixed_rows_identical": same_rows(ours_out["mixed"], hf_out["mixed"]),
            "loramix_vs_peft_mixed_first_token_identical": sum(
                a[0] == b[0] for a, b in zip(ours_out["mixed"], hf_out["mixed"])),
            **{f"{modes[0]}_vs_{m}_{kind}_rows_identical": same_rows(ours_out[kind], out[kind])
               for m, out in outputs.items() if m != modes[0] for kind in ("base", "mixed")},
        },
    }
    table = render(result)
    result["markdown"] = table
    print(json.dumps(result["checks"]), flush=True)
    print("\n" + table, flush=True)
    write(args.out, result)


def write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
