"""Launch configs for the shapes where loramix's wrapper trailed vLLM's inside vLLM (issue 17).

The first H200 run of bench/punica_gpu.py found three CUDA-graph-timed shapes slower than
PunicaWrapperGPU: the down projections (hidden_in 14336) at 16 and 64 tokens with one adapter,
0.93-0.96x. This part times candidate launch rules for the decode/short-prefill region of wide
inputs (tokens 2..64, hidden_in >= 8192: the shrink's split-K and K block, or the one-launch
fused kernel) against vLLM's wrapper on the same inputs, every pattern the plan must serve (a
captured graph keeps one plan for any adapter mix: 1 adapter, 8, 8 + base rows), and keeps per
token and rank bucket the candidate whose worst ratio to vLLM is lowest, if it beats the table's own.
The kept rules are written into the GPU's table (kernels/configs/<gpu>.json) for the rest of
the run, and into --out, so the layers part that follows times what was kept.

    PYTHONPATH=/tmp/site:$PWD python -m bench.punica_gpu --out "$OUT" --parts tune,layers
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

REGION = dict(min_hidden_in=8192)
# (min_tokens, max_tokens, tokens timed, min_rank, max_rank): a rule per token range and rank
# range (the sixth H200 session: one rule for ranks 16 and 64 left 8b.down at 16 tokens, one
# rank-64 adapter, 0.99x, with no candidate faster for it)
BUCKETS = ((2, 16, 16, 1, 16), (2, 16, 16, 17, 64), (17, 64, 64, 1, 16), (17, 64, 64, 17, 64))
TUNE_LAYERS = ("1b.down", "8b.down")
PAIR = dict(fused=False)  # a pair candidate's fused_when rule: the pair in its bucket, whatever
# rules an earlier tune left below it (first match decides)
MARGIN = 0.01  # a candidate must cut the worst ratio by this much to replace the table's


def candidates(max_rank: int = 16) -> list[tuple[str, dict]]:
    """(name, rules to prepend per table key) for one bucket's bounds (filled in later). Above
    rank 16 the pair's shrink may also split the rank (Launch.block_r 16 or 32: more programs
    when one adapter's few tiles would leave most of the GPU idle, as vLLM's block_n 16 does)."""
    out = [("table", {})]
    for split_k in (8, 16, 32, 64):
        for block_k in (128, 256):
            out.append((f"pair sk{split_k} bk{block_k}", {"fused_when": PAIR, "shrink": dict(
                block_m=16, block_k=block_k, split_k=split_k, num_warps=4, num_stages=3)}))
    for block_r in (16, 32) if max_rank > 16 else ():
        for split_k in (8, 16, 32):
            for block_k in (128, 256):
                out.append((f"pair sk{split_k} bk{block_k} br{block_r}", {"fused_when": PAIR, "shrink": dict(
                    block_m=16, block_k=block_k, split_k=split_k, block_r=block_r,
                    num_warps=4, num_stages=3)}))
    for split_k in (8, 16, 32):
        for block_k in (128, 256):
            out.append((f"fused sk{split_k} bk{block_k}", {"fused_when": {}, "fused": dict(
                block_m=16, block_k=block_k, block_n=128, split_k=split_k, num_warps=4,
                num_stages=2)}))
    return out


def with_rules(table: dict, rules: dict, bounds: dict) -> dict:
    """A copy of the table with each rule (bounded to `bounds`) put first under its key."""
    table = copy.deepcopy(table)
    for key, fields in rules.items():
        table[key] = [dict(bounds, **fields), *table.get(key, [])]
    return table


def pick(worst: dict[str, float]) -> str:
    """The candidate with the lowest worst ratio to vLLM, if it beats the table's own by
    MARGIN; else 'table' (no rule added)."""
    best = min(worst, key=worst.get)
    return best if worst[best] < worst["table"] - MARGIN else "table"


def clear_caches() -> None:
    from kernels import launch

    for fn in (launch.tuned_table, launch.shrink_launch, launch.expand_launch,
               launch.fused_launch, launch.use_fused, launch.pick_variant, launch._cuda_props):
        fn.cache_clear()


def _case(layer, num_tokens, pattern, rank, gens, vllm_wrapper):
    """Inputs of one case, vLLM's result and time."""
    import torch

    from bench import punica_gpu as pg
    from bench.timing import graph_time_us

    hidden_in, widths = pg.LAYERS[layer]
    host_gen, device_gen = gens
    mapping, index_to_id, ids = pg._mapping(num_tokens, pattern, host_gen)
    vllm_wrapper.update_metadata(mapping, index_to_id, pg.MAX_LORAS, 32000)
    rnd = lambda *shape: torch.randn(*shape, generator=device_gen, device="cuda").to(torch.bfloat16)  # noqa: E731
    x = rnd(num_tokens, hidden_in)
    lora_a = [rnd(pg.MAX_LORAS, rank, hidden_in) / hidden_in**0.5 for _ in widths]
    lora_b = [rnd(pg.MAX_LORAS, w, rank) * 0.05 for w in widths]
    y0 = rnd(num_tokens, sum(widths))
    y_ref = y0.clone()
    a4, b4 = tuple(a.unsqueeze(1) for a in lora_a), tuple(b.unsqueeze(1) for b in lora_b)
    vllm_wrapper.add_lora_linear(y_ref, x, a4, b4, 1.0, widths)
    y = y0.clone()
    vllm_us = graph_time_us(lambda: vllm_wrapper.add_lora_linear(y, x, a4, b4, 1.0, widths), 10)
    slot_ids = torch.tensor([index_to_id.index(i) if i > 0 else -1 for i in ids],
                            dtype=torch.int32, device="cuda")
    return dict(x=x, lora_a=lora_a, lora_b=lora_b, y0=y0, y_ref=y_ref, slot_ids=slot_ids,
                vllm_us=vllm_us)


def _ours(case, stem: str) -> tuple[float, float]:
    """(time in us, relative error of the delta against vLLM's) with the table `stem`."""
    import kernels
    from bench.timing import graph_time_us
    from kernels import launch, triton_ops

    meta = kernels.build_meta(case["slot_ids"], 8)
    variant = launch.Variant(records=True, table=stem)
    x, lora_a, lora_b = case["x"], case["lora_a"], case["lora_b"]
    y = case["y0"].clone()
    plan = triton_ops._plan(y, x, lora_a, lora_b, 1.0, meta, None, variant)  # as planned calls do
    plan.run(y, x, lora_a, lora_b, 1.0)
    ref, y0 = case["y_ref"].double(), case["y0"].double()
    rel = ((y.double() - ref).norm() / (ref - y0).norm().clamp_min(1e-30)).item()
    return graph_time_us(lambda: plan.run(y, x, lora_a, lora_b, 1.0), 10), rel


def part_tune(args, deadline: float) -> dict:
    import torch

    from bench import punica_gpu as pg
    from kernels import launch

    if not torch.cuda.is_available():
        return dict(skipped="CUDA only: the candidates are Triton launch configs timed by graphs")
    gpu = torch.cuda.get_device_name()
    table_path = launch.CONFIG_DIR / f"{gpu.replace(' ', '_')}.json"
    table = json.loads(table_path.read_text())
    _, vllm_wrapper = pg._wrappers("cuda", 4096)
    gens = torch.Generator().manual_seed(1), torch.Generator(device="cuda").manual_seed(1)
    rows, chosen, stems = [], {}, []
    try:
        for lo, hi, num_tokens, rank_lo, rank_hi in BUCKETS:
            bounds = dict(min_tokens=lo, max_tokens=hi, min_rank=rank_lo, max_rank=rank_hi,
                          **REGION)
            ranks = [r for r in pg.RANKS if rank_lo <= r <= rank_hi]
            cases = [(layer, rank, pattern, _case(layer, num_tokens, pattern, rank, gens, vllm_wrapper))
                     for layer in TUNE_LAYERS for rank in ranks for pattern in pg.PATTERNS]
            scores = {}
            for i, (name, rules) in enumerate(candidates(rank_hi)):
                if time.monotonic() > deadline:
                    break
                stem = f"tune_{lo}_{rank_lo}_{i}"
                (launch.CONFIG_DIR / f"{stem}.json").write_text(
                    json.dumps(with_rules(table, rules, bounds)))
                stems.append(stem)
                ratios = []
                for layer, rank, pattern, case in cases:
                    us, rel = _ours(case, stem)
                    ratio = us / case["vllm_us"] if rel < 2e-2 else float("inf")
                    ratios.append(ratio)
                    rows.append(dict(tokens=num_tokens, candidate=name, layer=layer, rank=rank,
                                     pattern=pattern, ours_us=us, vllm_us=case["vllm_us"],
                                     rel_err=rel))
                scores[name] = (max(ratios), rules)
                pg.log(f"tune {num_tokens} tokens rank {rank_lo}-{rank_hi} {name}: "
                       f"worst ratio {max(ratios):.3f}")
            if "table" not in scores:
                continue
            best = pick({name: worst for name, (worst, _) in scores.items()})
            chosen[f"{lo}-{hi} tokens, rank {rank_lo}-{rank_hi}"] = dict(
                candidate=best, worst_ratio=scores[best][0], table_worst_ratio=scores["table"][0])
            table = with_rules(table, scores[best][1], bounds)
    finally:
        for stem in stems:
            (launch.CONFIG_DIR / f"{stem}.json").unlink(missing_ok=True)
    changed = any(c["candidate"] != "table" for c in chosen.values())
    if changed:
        table["note"] = table.get("note", "") + (
            f" Tune {time.strftime('%Y-%m-%d')} (bench/punica_tune.py, inside vLLM against "
            f"PunicaWrapperGPU): {json.dumps(chosen)}.")
        table_path.write_text(json.dumps(table, indent=2) + "\n")
        Path(args.out, table_path.name).write_text(table_path.read_text())
        clear_caches()
    return dict(gpu=gpu, chosen=chosen, table_changed=changed, rows=rows)
