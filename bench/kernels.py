"""Benchmark of loramix's multi-LoRA kernels against torch baselines and the bytes floor.

Run on a CUDA GPU (one H200 here); bench/gpu_kernels_run.sh is the one-call driver:
    PYTHONUNBUFFERED=1 python3 bench/kernels.py --out $OUT/kernels.json --deadline-s 420
Steps: (1) GPU correctness of the full grid against the torch reference for v2 and every
kernel variant / candidate config in COMBOS (bf16, plus fp16/fp32 spot checks), in parallel
worker processes (which also fill triton's compile cache), (2) CUDA-graph replay check of
every variant, (3) optional config sweep (--sweep), (4) timings by CUDA-graph replay (median):
v2 fused / unfused, each variant, the candidate table, torch gather-bmm, torch per-adapter
loop, the base linear layer, and the bytes floor. Decode rows are timed first; past
--deadline-s the repetitions shrink. Writes JSON after every row; `--render JSON --results
bench/RESULTS.md` turns a JSON into the "## Kernels" section (with the variant A/B table and
the rules the data supports). `--smoke` runs a tiny grid on CPU (TRITON_INTERPRET=1) through
every step to check the script itself.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import graph_time_us  # noqa: E402  (bench/timing.py)

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
RANKS = [16, 64]
TOKENS = [1, 16, 64, 256, 1024, 4096]
ADAPTERS = [1, 8, 32]
DECODE_MAX_TOKENS = 64
FUSED_MAX_TOKENS = 256  # the fused kernel is timed up to here
CANDIDATE = "NVIDIA_H200_candidate"  # kernels/configs/<CANDIDATE>.json
# column -> (fused, kernels.launch.Variant spec); 'unfused' / 'fused' are v2
COMBOS = {
    "unfused": (False, "v2"), "fused": (True, "v2"),
    "unfused_rec": (False, "rec"), "unfused_pdl": (False, "pdl"),
    "unfused_rec_pdl": (False, "rec+pdl"), "fused_rec": (True, "rec"),
    "unfused_cand": (False, f"v2@{CANDIDATE}"), "fused_cand": (True, f"v2@{CANDIDATE}"),
}
# vLLM 0.33 Triton lora_shrink + lora_expand on an H200, from shared/ANCHORS.md (bf16, graph
# replay, median, µs): an anchor, NOT measured by this script (no vLLM on the GPU machine).
VLLM_ANCHOR = {(4096, 4096, 16, 1, 1): 7.7, (4096, 4096, 16, 16, 8): 9.2,
               (4096, 4096, 16, 64, 32): 21.9, (4096, 4096, 16, 1024, 8): 21.1,
               (4096, 4096, 16, 4096, 32): 118.9, (4096, 4096, 64, 64, 32): 45.4,
               (4096, 4096, 64, 4096, 32): 163.6, (4096, 14336, 16, 4096, 32): 310.3,
               (4096, 14336, 64, 64, 32): 71.0, (14336, 4096, 16, 16, 8): 9.4,
               (14336, 4096, 64, 4096, 32): 248.6}


def cases(shapes, ranks, tokens, adapters):
    """(K, N, rank, tokens, adapters), skipping more adapters than tokens."""
    return [(k, n, r, t, a) for (k, n) in shapes for r in ranks for t in tokens for a in adapters
            if a <= t]


def make_inputs(k, n, rank, tokens, adapters, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = rnd(tokens, k).to(dtype)
    lora_a = (rnd(adapters, rank, k) / k ** 0.5).to(dtype)
    lora_b = (rnd(adapters, n, rank) / rank ** 0.5).to(dtype)
    y = rnd(tokens, n).to(dtype)
    slot_ids = (torch.arange(tokens, device=device) % adapters).to(torch.int32)
    return y, x, lora_a, lora_b, slot_ids


# ---------------------------------------------------------------- baselines (torch)
def gather_bmm(y, x, lora_a, lora_b, slot_ids, scaling):
    """What vLLM's torch path does: gather each token's A and B, then batched products."""
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R]
    ids = slot_ids.long()
    buf = torch.einsum("tk,trk->tr", x, lora_a[ids]) * scaling
    y += torch.einsum("tr,tnr->tn", buf, lora_b[ids])
    return y


def per_adapter_loop(groups):
    """One gather + two matmuls + index_add per active adapter (rows grouped ahead of time)."""
    def run(y, x, lora_a, lora_b, slot_ids, scaling):
        for slot, rows in groups:
            delta = (x.index_select(0, rows) @ lora_a[slot].T * scaling) @ lora_b[slot].T
            y.index_add_(0, rows, delta)
        return y
    return run


# ---------------------------------------------------------------- timing


def eager_time_us(fn, reps: int = 3) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e6


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_us(fn, device, replays: int = 15) -> float:
    if device != "cuda":
        return eager_time_us(fn, reps=1)
    est = eager_time_us(fn)
    inner = int(max(1, min(50, 3000 / max(est, 1.0))))
    return graph_time_us(fn, inner, replays)


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    if device != "cuda":
        return float("nan")
    src = torch.randn(1 << 29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    us = graph_time_us(lambda: dst.copy_(src), inner=5, replays=10)
    del src, dst
    return 2 * 4 * (1 << 29) / (us * 1e-6)


def launch_us(device) -> float:
    """Graph-replay cost of one minimal kernel (a 1-element add): the 'plus one launch'."""
    if device != "cuda":
        return float("nan")
    tiny = torch.zeros(1, device=device)
    return graph_time_us(lambda: tiny.add_(1.0), inner=50)


def floor_bytes(k, n, rank, tokens, adapters, elem=2):
    active = min(tokens, adapters)
    return elem * (tokens * k + active * rank * (k + n) + 2 * tokens * n)


# ---------------------------------------------------------------- correctness
def combos_for(tokens: int, k, n, rank, adapters, gpu: str) -> dict:
    """COMBOS that apply to a shape: fused up to FUSED_MAX_TOKENS; the candidate table only
    where its launch configs differ from the GPU's own (else it runs the same kernels)."""
    out = {}
    for col, (fused, spec) in COMBOS.items():
        if fused and tokens > FUSED_MAX_TOKENS:
            continue
        if spec.endswith(CANDIDATE) and same_configs(gpu, CANDIDATE, k, n, rank, tokens,
                                                     adapters, fused):
            continue
        out[col] = (fused, spec)
    return out


def same_configs(gpu: str, table: str, k, n, rank, tokens, adapters, fused: bool) -> bool:
    from kernels import launch
    if fused:
        get = lambda name: launch.fused_launch(name, 132, tokens, adapters, k, n, rank, 1)  # noqa
    else:
        get = lambda name: (launch.shrink_launch(name, 132, tokens, adapters, k, rank, 1),  # noqa
                            launch.expand_launch(name, tokens, n, rank))
    return get(gpu) == get(table)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def check_out(out, expected, y, ids, dtype) -> tuple[bool, float]:
    """Idle rows bit-identical (they hold NaN), active rows finite and within tolerance."""
    idle, act = ids < 0, ids >= 0
    same_idle = torch.equal(_bits(out[idle]), _bits(y[idle]))
    finite = bool(torch.isfinite(out[act]).all())
    ref = expected[act].double()
    err = float((out[act].double() - ref).norm() / ref.norm().clamp_min(1e-12))
    tol = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return same_idle and finite and err < tol, err  # NaN err fails the comparison


def check_cases(jobs: list, device: str) -> list[dict]:
    """jobs: (case, dtype name, tensor scaling?, seed, combo columns). One reference per case,
    every combo against it; inputs poisoned (idle rows NaN, some tokens idle)."""
    from kernels import build_meta, launch, reference, triton_ops
    results = []
    for (k, n, r, t, a), dtype_name, tensor_scale, seed, cols in jobs:
        dtype = getattr(torch, dtype_name)
        y, x, la, lb, ids = make_inputs(k, n, r, t, a, dtype, device, seed)
        ids = torch.where(torch.arange(t, device=device) % 7 == 3, -1, ids)  # some idle rows
        y[ids < 0] = float("nan")
        scaling = torch.rand(a, device=device) + 0.5 if tensor_scale else 0.5
        meta = build_meta(ids, a)
        expected = reference.add_lora(y.clone(), x, la, lb, ids, scaling)
        for col in cols:
            fused, spec = COMBOS[col]
            try:
                out = triton_ops.add_lora(y.clone(), x, la, lb, ids, scaling, meta=meta,
                                          fused=fused, variant=launch.Variant.parse(spec))
                ok, err = check_out(out, expected, y, ids, dtype)
            except Exception as exc:  # a variant that does not build must not end the run
                ok, err = False, repr(exc)[:300]
            results.append(dict(case=(k, n, r, t, a), dtype=dtype_name, combo=col, ok=ok,
                                err=err))
    return results


SPOT_CASES = [(96, 160, 8, 37, 5), (4096, 1024, 16, 64, 8), (160, 4096, 64, 300, 3)]
SPOT_COMBOS = ["unfused", "fused", "unfused_rec_pdl", "fused_rec"]


def correctness_jobs(grid, gpu: str, spot: bool) -> list[list]:
    """Check jobs grouped so that each group needs its own kernels (rank, token class, K):
    one worker per group compiles a disjoint share of the kernels."""
    groups: dict = {}
    for i, (k, n, r, t, a) in enumerate(grid):
        cls = 0 if t <= DECODE_MAX_TOKENS else 1 if t <= FUSED_MAX_TOKENS else 2
        cols = list(combos_for(t, k, n, r, a, gpu))
        groups.setdefault((r, cls, k), []).append(((k, n, r, t, a), "bfloat16", False, i, cols))
    if spot:
        for dtype in ("float16", "float32", "bfloat16"):
            for i, case in enumerate(SPOT_CASES):
                cols = [c for c in SPOT_COMBOS if COMBOS[c][0] is False or case[3] <= 256]
                groups.setdefault(("spot", dtype), []).append((case, dtype, True, 1000 + i, cols))
    return list(groups.values())


def correctness(grid, device, gpu: str, jobs: int, spot: bool = True):
    t0 = time.perf_counter()
    groups = correctness_jobs(grid, gpu, spot)
    results = []
    if jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(groups)), mp_context=ctx) as pool:
            for part in pool.map(check_cases, groups, [device] * len(groups)):
                results += part
    else:
        for group in groups:
            results += check_cases(group, device)
    failures = [r for r in results if not r["ok"]]
    bf16 = [r["err"] for r in results if r["dtype"] == "bfloat16" and r["ok"]]
    per_combo = {c: sum(1 for r in results if r["combo"] == c) for c in COMBOS}
    print(f"correctness: {len(results)} checks ({per_combo}), {len(failures)} failures, worst "
          f"bf16 rel err {max(bf16, default=0.0):.2e}, {time.perf_counter() - t0:.0f}s",
          flush=True)
    for f in failures[:20]:
        print("  FAIL", f, flush=True)
    return dict(checks=len(results), failures=failures, worst_bf16_rel_err=max(bf16, default=0.0),
                per_combo=per_combo, seconds=time.perf_counter() - t0)


def graph_check(device) -> list[dict]:
    """Replaying a captured add_lora 3 times equals 3 reference applications, for v2 and every
    variant (fused barrier counters must reset themselves; PDL edges must survive capture;
    meta must need no host sync)."""
    from kernels import build_meta, launch, reference, triton_ops
    out = []
    for k, n, r, t, a in [(4096, 4096, 16, 16, 8), (4096, 1024, 64, 64, 32),
                          (14336, 4096, 16, 256, 8)]:
        for col, (fused, spec) in COMBOS.items():
            if spec.endswith(CANDIDATE):
                continue
            y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device, seed=7)
            meta = build_meta(ids, a)
            expected = y.clone()
            for _ in range(3):
                reference.add_lora(expected, x, la, lb, ids, 0.5)
            work = y.clone()
            variant = launch.Variant.parse(spec)
            run = lambda: triton_ops.add_lora(work, x, la, lb, ids, 0.5, meta=meta,  # noqa: E731
                                              fused=fused, variant=variant)
            try:
                run()  # compile outside the capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    run()
                work.copy_(y)
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                err = float((work.double() - expected.double()).norm() / expected.double().norm())
                ok = bool(torch.isfinite(work).all()) and err < 1e-2
            except Exception as exc:
                err, ok = repr(exc)[:300], False
            out.append(dict(case=(k, n, r, t, a), combo=col, err=err, ok=ok))
            print(f"graph replay x3 {k}->{n} r{r} t{t} a{a} {col}: rel err "
                  f"{err if isinstance(err, str) else f'{err:.1e}'} {'ok' if ok else 'FAIL'}",
                  flush=True)
    return out


# ---------------------------------------------------------------- sweep
# Candidate overrides of the built-in launch configs (dataclasses.replace on launch.Launch)
SWEEP = {
    "fused": [{}, {"block_n": 64}, {"block_n": 256}, {"block_k": 64},
              {"block_k": 256, "num_stages": 3}, {"num_warps": 8}, {"split_k": 8},
              {"split_k": 16}, {"split_k": 32},
              {"block_n": 64, "block_k": 64, "num_stages": 3}, {"num_stages": 3}],
    "shrink": [{}, {"block_k": 64}, {"block_k": 256}, {"num_stages": 2}, {"num_warps": 8},
               {"split_k": 2}, {"split_k": 4}, {"split_k": 16}, {"block_m": 16}, {"block_m": 64},
               {"block_m": 64, "block_k": 64}],
    "expand": [{}, {"block_n": 64}, {"block_n": 256}, {"num_warps": 8}, {"num_stages": 3},
               {"block_m": 32}, {"block_m": 64}, {"block_n": 256, "num_warps": 8}],
}
SWEEP_CASES = [(4096, 4096, 16, 16, 8), (4096, 4096, 16, 64, 32), (14336, 4096, 16, 16, 8),
               (4096, 1024, 16, 16, 8), (4096, 14336, 64, 16, 8), (4096, 4096, 16, 256, 8),
               (4096, 14336, 64, 1024, 1), (4096, 1024, 64, 256, 1),
               (4096, 14336, 16, 64, 32), (4096, 4096, 64, 64, 32), (4096, 1024, 16, 1, 1),
               (4096, 4096, 16, 1024, 8), (4096, 4096, 64, 4096, 32),
               (14336, 4096, 64, 4096, 32), (4096, 14336, 16, 4096, 32)]


def sweep(device):
    """Time candidate launch configs per op on representative shapes (no autotuning at serve)."""
    from kernels import build_meta, launch, triton_ops
    out = []
    originals = dict(fused=launch.fused_launch, shrink=launch.shrink_launch,
                     expand=launch.expand_launch)
    try:
        for k, n, r, t, a in SWEEP_CASES:
            y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device)
            meta = build_meta(ids, a)
            base = dict(fused=originals["fused"]("x", 132, t, a, k, n, r, 1),
                        shrink=originals["shrink"]("x", 132, t, a, k, r, 1),
                        expand=originals["expand"]("x", t, n, r))
            for op, cands in SWEEP.items():
                if op == "fused" and t > 256:
                    continue
                for cand in cands:
                    cfg = dataclasses.replace(base[op], **cand)
                    for name, fn in originals.items():
                        setattr(launch, name + "_launch", fn)
                    setattr(launch, op + "_launch", lambda *_, c=cfg: c)
                    fused = op == "fused"
                    us = time_us(lambda: triton_ops.add_lora(y, x, la, lb, ids, 0.5, meta=meta,
                                                             fused=fused), device)
                    out.append(dict(case=(k, n, r, t, a), op=op, cfg=cand, us=us))
                    print(f"sweep {k}->{n} r{r} t{t} a{a} {op} {cand} {us:.1f}us", flush=True)
    finally:
        for name, fn in originals.items():
            setattr(launch, name + "_launch", fn)
    return out


# ---------------------------------------------------------------- timings
def bench_case(k, n, r, t, a, device, bandwidth, replays=15):
    from kernels import build_meta, launch, triton_ops
    y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device)
    meta = build_meta(ids, a)
    groups = [(s, torch.nonzero(ids == s).flatten()) for s in range(min(a, t))]
    row = dict(k=k, n=n, rank=r, tokens=t, adapters=a)
    row["floor_us"] = floor_bytes(k, n, r, t, a) / bandwidth * 1e6
    gpu, _ = launch.device_key(x.device)
    ours = lambda fused, v: lambda: triton_ops.add_lora(  # noqa: E731
        y, x, la, lb, ids, 0.5, meta=meta, fused=fused, variant=v)
    runs = {col: ours(fused, launch.Variant.parse(spec))
            for col, (fused, spec) in combos_for(t, k, n, r, a, gpu).items()}
    runs["gather_bmm"] = lambda: gather_bmm(y, x, la, lb, ids, 0.5)
    runs["loop"] = lambda: per_adapter_loop(groups)(y, x, la, lb, ids, 0.5)
    weight = torch.randn(n, k, device=device).to(x.dtype)
    runs["base_linear"] = lambda: torch.nn.functional.linear(x, weight)
    if t <= DECODE_MAX_TOKENS:  # v2 once more, last: the spread between equal versions
        runs["unfused_again"] = runs["unfused"]
    for name, fn in runs.items():
        try:
            row[name + "_us"] = time_us(fn, device, replays)
        except Exception as exc:  # one failing variant must not end the run
            row[name + "_error"] = repr(exc)[:300]
            print(f"  {name} failed: {exc!r}"[:400], flush=True)
    row["replays"] = replays
    pick_ours(row, gpu)
    return row


def timings(grid, device, save_rows, deadline_s: float, start: float):
    """Decode rows first (the question of this run), then prefill; rows saved as they come.
    When the projected end passes the deadline the graph replays drop from 15 to 5."""
    bandwidth = copy_bandwidth(device)
    one_launch = launch_us(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, one tiny launch {one_launch:.1f} us",
          flush=True)
    order = sorted(grid, key=lambda c: (c[3] > DECODE_MAX_TOKENS, grid.index(c)))
    rows, t_rows = [], time.perf_counter()
    out = dict(bandwidth=bandwidth, launch_us=one_launch, rows=rows)
    for i, case in enumerate(order):
        elapsed = time.perf_counter() - start
        per_row = (time.perf_counter() - t_rows) / max(1, i)
        replays = 15 if not deadline_s or elapsed + per_row * (len(order) - i) < deadline_s \
            else 5
        row = bench_case(*case, device, bandwidth if device == "cuda" else 1e12, replays)
        rows.append(row)
        rows.sort(key=lambda r: grid.index(_key(r)))
        print(format_row(row, one_launch), flush=True)
        save_rows(out)
        torch.cuda.empty_cache() if device == "cuda" else None
    return out


# ---------------------------------------------------------------- reporting
def verdict(row, one_launch):
    best_torch = min(row["gather_bmm_us"], row["loop_us"])
    if row["tokens"] <= DECODE_MAX_TOKENS:
        ok = row["ours_us"] <= 2 * row["floor_us"] + one_launch and \
            row["gather_bmm_us"] >= 3 * row["ours_us"]
    else:
        ok = row["ours_us"] <= best_torch
    return "yes" if ok else "no"


def _f(v):
    return "-" if v is None else f"{v:.1f}"


HEADER = ("| K→N | rank | tokens | adapters | floor | ours | fused | unfused | gather-bmm | loop "
          "| base linear | ours/floor | target met | vLLM (anchor) |")


def format_row(row, one_launch):
    return (f"| {row['k']}→{row['n']} | {row['rank']} | {row['tokens']} | {row['adapters']} | "
            f"{_f(row['floor_us'])} | {_f(row['ours_us'])} | {_f(row.get('fused_us'))} | "
            f"{_f(row['unfused_us'])} | {_f(row['gather_bmm_us'])} | {_f(row['loop_us'])} | "
            f"{_f(row['base_linear_us'])} | {row['ours_us'] / row['floor_us']:.1f} | "
            f"{verdict(row, one_launch)} | {_f(VLLM_ANCHOR.get(_key(row)))} |")


def _key(row: dict) -> tuple:
    return row["k"], row["n"], row["rank"], row["tokens"], row["adapters"]


def combo_column(fused: bool, records: bool, pdl: bool) -> str:
    if fused:
        return "fused_rec" if records else "fused"
    return "unfused" + ("_rec" if records else "") + ("_pdl" if pdl else "")


def pick_ours(row: dict, gpu: str) -> None:
    """'ours' = what the host rules (kernels/configs/<gpu>.json: fused_when, records_when,
    pdl_when) pick for this shape, from the columns this row has."""
    from kernels import launch
    shape = (row["tokens"], row["adapters"], row["rank"], row["k"])
    fused = row.get("fused_us") is not None and launch.use_fused(gpu, *shape)
    variant = launch.pick_variant(gpu, *shape)
    col = combo_column(fused, variant.records, variant.pdl and not fused)
    col = col if row.get(col + "_us") is not None else "fused" if fused else "unfused"
    row["auto_is_fused"], row["ours_column"] = fused, col
    row["ours_us"] = row[col + "_us"]


AB_COLUMNS = [("unfused", "pair v2"), ("unfused_again", "pair v2 again"),
              ("unfused_rec", "pair rec"), ("unfused_pdl", "pair pdl"),
              ("unfused_rec_pdl", "pair rec+pdl"), ("fused", "fused v2"),
              ("fused_rec", "fused rec"), ("unfused_cand", "pair cand"),
              ("fused_cand", "fused cand")]
VARIANT_BASE = {"unfused_rec": "unfused", "unfused_pdl": "unfused",
                "unfused_rec_pdl": "unfused", "fused_rec": "fused",
                "unfused_cand": "unfused", "fused_cand": "fused"}
TOKEN_CLASSES = [("≤ 64 tokens", 1, DECODE_MAX_TOKENS), ("65–256", 65, 256),
                 ("≥ 257", 257, 1 << 30)]


def _geo(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def _ratios(rows, col, base, lo=1, hi=1 << 30) -> list[float]:
    return [r[col + "_us"] / r[base + "_us"] for r in rows if lo <= r["tokens"] <= hi
            and r.get(col + "_us") is not None and r.get(base + "_us") is not None]


def noise(rows) -> tuple[float, float]:
    """(median, max) of |v2 again / v2 - 1| over the decode rows: the spread of equal versions."""
    spread = [abs(v - 1) for v in _ratios(rows, "unfused_again", "unfused")]
    return (statistics.median(spread), max(spread)) if spread else (float("nan"),) * 2


def variant_section(rows) -> list[str]:
    """A/B table of the kernel variants and candidate configs against v2, same run."""
    if not any(r.get("unfused_rec_us") is not None for r in rows):
        return []
    med, top = noise(rows)
    lines = ["", "### Kernel variants and candidate configs (A/B against v2, same run)", "",
             f"Variants of the same kernels (kernels/launch.py `Variant`): 'rec' = one-record "
             f"tile metadata, 'pdl' = programmatic dependent launch of the expand, 'cand' = "
             f"kernels/configs/{CANDIDATE}.json (timed only where its configs differ). "
             f"Spread of equal versions (v2 timed twice, decode rows): median "
             f"{100 * med:.1f}%, max {100 * top:.1f}%. Ratio = variant / v2 of the same path "
             f"(< 1 = faster), geomean [min–max] over the rows:", ""]
    lines.append("| variant | " + " | ".join(c[0] for c in TOKEN_CLASSES) + " |")
    lines.append("|---|" + "---|" * len(TOKEN_CLASSES))
    for col, base in VARIANT_BASE.items():
        cells = []
        for _, lo, hi in TOKEN_CLASSES:
            ratios = _ratios(rows, col, base, lo, hi)
            cells.append(f"{_geo(ratios):.3f} [{min(ratios):.2f}–{max(ratios):.2f}] "
                         f"n={len(ratios)}" if ratios else "-")
        lines.append(f"| {dict(AB_COLUMNS)[col]} | " + " | ".join(cells) + " |")
    lines += ["", "| K→N | rank | tokens | adapters | " + " | ".join(c[1] for c in AB_COLUMNS)
              + " |", "|" + "---|" * (4 + len(AB_COLUMNS))]
    for r in rows:
        lines.append(f"| {r['k']}→{r['n']} | {r['rank']} | {r['tokens']} | {r['adapters']} | "
                     + " | ".join(_f(r.get(c + "_us")) for c, _ in AB_COLUMNS) + " |")
    return lines + ["", *proposal(rows)]


def proposal(rows) -> list[str]:
    """Host rules the data supports: per token count, a variant is adopted for the path the
    current rules pick when its geomean beats v2 by more than the margin and no row loses
    more than the margin (margin = max(3%, 2x the median spread of equal versions))."""
    med, _ = noise(rows)
    margin = max(0.03, 2 * med) if med == med else 0.03
    wins = {"records_when": [], "pdl_when": []}
    lines = [f"Rules the data supports (margin {100 * margin:.1f}%), per token count, for the "
             f"path the current fused_when picks:", ""]
    for t in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == t]
        best = ("v2", 1.0, 1.0)
        for rec, pdl in ((True, False), (False, True), (True, True)):
            ratios = []
            for r in at:
                fused = r.get("auto_is_fused", False)
                if pdl and fused:
                    ratios.append(1.0)  # PDL does not apply to the single fused launch
                    continue
                col, base = combo_column(fused, rec, pdl), "fused" if fused else "unfused"
                if r.get(col + "_us") and r.get(base + "_us"):
                    ratios.append(r[col + "_us"] / r[base + "_us"])
            if ratios and _geo(ratios) < min(best[1], 1 - margin) and max(ratios) < 1 + margin:
                best = ("+".join(n for n, on in (("rec", rec), ("pdl", pdl)) if on),
                        _geo(ratios), max(ratios))
        lines.append(f"- {t} tokens: {best[0]}" + (f" (geomean {best[1]:.3f}, worst row "
                                                    f"{best[2]:.3f})" if best[0] != "v2" else ""))
        if "rec" in best[0]:
            wins["records_when"].append(t)
        if "pdl" in best[0]:
            wins["pdl_when"].append(t)
    present = sorted({r["tokens"] for r in rows})
    rules = {key: _token_ranges(ts, present) for key, ts in wins.items() if ts}
    lines += ["", "Proposed additions to kernels/configs/NVIDIA_H200.json: `"
              + json.dumps(rules) + "`" if rules else "No variant clears the margin: keep v2."]
    return lines


def _token_ranges(winners: list[int], present: list[int]) -> list[dict]:
    """Contiguous runs of the measured token counts as min_tokens/max_tokens rules."""
    out, prev = [], 0
    for t in present:
        if t in winners:
            if out and out[-1]["max_tokens"] == prev:
                out[-1]["max_tokens"] = t
            else:
                out.append({"min_tokens": prev + 1, "max_tokens": t})
        prev = t
    return out


def summary(rows, one_launch) -> list[str]:
    if not rows:
        return ["- No timings in this run."]
    decode = [r for r in rows if r["tokens"] <= DECODE_MAX_TOKENS]
    prefill = [r for r in rows if r["tokens"] > DECODE_MAX_TOKENS]
    met = lambda rs: sum(verdict(r, one_launch) == "yes" for r in rs)  # noqa: E731
    near = sum(r["ours_us"] <= 2 * r["floor_us"] + one_launch for r in decode)
    vs_bmm = [r["gather_bmm_us"] / r["ours_us"] for r in decode]
    vs_best = [min(r["gather_bmm_us"], r["loop_us"]) / r["ours_us"] for r in prefill]
    anchors = [VLLM_ANCHOR[_key(r)] / r["ours_us"] for r in rows if _key(r) in VLLM_ANCHOR]
    fast = sum(v >= 3 for v in vs_bmm)
    lo, hi = lambda v: min(v, default=math.nan), lambda v: max(v, default=math.nan)  # noqa
    overhead = ", ".join(
        f"{r['k']}→{r['n']} r{r['rank']} {100 * r['ours_us'] / r['base_linear_us']:.0f}%"
        for r in decode if r["tokens"] == 16 and r["adapters"] == 8)
    return [
        f"- Decode (≤ {DECODE_MAX_TOKENS} tokens): {met(decode)}/{len(decode)} rows meet both "
        f"targets; {near}/{len(decode)} within 2× floor + one launch; {fast}/{len(decode)} "
        f"≥ 3× faster than gather-bmm (range {lo(vs_bmm):.1f}–{hi(vs_bmm):.1f}×).",
        f"- LoRA time as a share of the base linear layer at 16 tokens over 8 adapters "
        f"(ANCHORS goal ≤ 30%): {overhead}.",
        f"- Prefill: {met(prefill)}/{len(prefill)} rows at least as fast as the best torch "
        f"baseline (best-torch / ours {lo(vs_best):.2f}–{hi(vs_best):.1f}×).",
        f"- Against the vLLM anchors (shared/ANCHORS.md, measured earlier on an H200, not in "
        f"this run): vLLM / ours {min(anchors):.2f}–{max(anchors):.1f}× on the "
        f"{len(anchors)} matching rows." if anchors else "- No vLLM anchor rows matched.",
    ]


ANCHOR_BANDWIDTH = 4.28e12  # shared/ANCHORS.md's copy bandwidth on an H200


def render(result: dict) -> str:
    t = result["timings"]
    c = result["correctness"]
    # The stricter (higher) of the measured and the anchors' bandwidth sets the floor.
    bandwidth = max(t["bandwidth"], ANCHOR_BANDWIDTH)
    for row in t["rows"]:
        pick_ours(row, result["gpu"])
        row["floor_us"] = floor_bytes(row["k"], row["n"], row["rank"], row["tokens"],
                                      row["adapters"]) / bandwidth * 1e6
    graphs = result.get("graph_check")
    graph_text = (f"{sum(g['ok'] for g in graphs)}/{len(graphs)} match the reference"
                  if graphs else "not part of this run (see bench/kernels_notes.md)")
    if t.get("truncated"):
        graph_text += f"; TIMINGS INCOMPLETE ({len(t['rows'])} rows, the run hit its deadline)"
    lines = [
        "## Kernels",
        "",
        f"GPU: {result['gpu']} (torch {result['torch']}, triton {result['triton']}), produced by "
        f"`bench/kernels.py`. bf16, CUDA-graph replay, median, µs. Tokens spread evenly over "
        f"the adapters; weights cache-warm. Floor = bytes (x + active A and B + y read and "
        f"written) over {bandwidth / 1e12:.2f} TB/s, the higher of this run's measured "
        f"device-to-device copy ({t['bandwidth'] / 1e12:.2f} TB/s) and the anchors' 4.28 TB/s "
        f"(the stricter floor); one minimal kernel launch costs "
        f"{t['launch_us']:.1f} µs in graph replay. 'ours' = what the host rule in "
        f"kernels/configs/ picks between 'fused' (one launch) and 'unfused' (shrink + expand; "
        f"fused is timed up to 256 tokens). 'loop' = torch per-adapter "
        f"loop, 'gather-bmm' = vLLM's torch path. Targets: ≤ {DECODE_MAX_TOKENS} tokens within "
        f"2× floor + one launch and ≥ 3× faster than gather-bmm; prefill ≤ best torch. "
        f"'vLLM (anchor)' is copied from shared/ANCHORS.md: vLLM 0.33's kernels measured "
        f"earlier on an H200, NOT measured here (vLLM is not installed on the GPU machine).",
        "",
        f"GPU correctness before timing: {c['checks']} checks against the torch reference, "
        f"{len(c['failures'])} failures, worst bf16 relative error {c['worst_bf16_rel_err']:.1e}; "
        f"CUDA-graph replay (3 replays of a captured add_lora, fused and unfused, each "
        f"variant where the run had variants): "
        f"{graph_text}.",
        "",
        *summary(t["rows"], t["launch_us"]),
        "",
        HEADER,
        "|" + "---|" * 14,
    ]
    lines += [format_row(r, t["launch_us"]) for r in t["rows"]]
    lines += variant_section(t["rows"])
    return "\n".join(lines) + "\n"


def write_section(results_path: Path, section: str) -> None:
    """Replace (or append) the '## Kernels' section of RESULTS.md, leaving other sections."""
    text = results_path.read_text() if results_path.exists() else "# Benchmark results\n\n"
    start = text.find("## Kernels")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if nxt < 0 else text[nxt:])
    results_path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--sweep", action="store_true", help="time candidate launch configs first")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--smoke", "--dry-run", action="store_true",
                   help="tiny grid on CPU (interpreter) through every step")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the correctness grid (default 12 on a GPU)")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="past this many seconds from the start, time with fewer repetitions")
    p.add_argument("--render", type=Path, help="render this JSON into --results and exit")
    p.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    args = p.parse_args(argv)
    if args.render:
        write_section(args.results, render(json.loads(args.render.read_text())))
        return
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from kernels import launch
    grid = cases(SHAPES, RANKS, TOKENS, ADAPTERS) if device == "cuda" else \
        cases([(96, 160)], [16], [1, 16, 80], [1, 8])
    gpu, _ = launch.device_key(torch.device(device))
    result = dict(gpu=gpu if device == "cuda" else "cpu (smoke run)", torch=torch.__version__,
                  triton=triton.__version__, combos=COMBOS)
    save = (lambda: args.out.write_text(json.dumps(result, indent=1))) if args.out else (
        lambda: None)
    jobs = args.jobs or (12 if device == "cuda" else 1)
    result["correctness"] = correctness(grid, device, gpu, jobs, spot=device == "cuda") \
        if not args.skip_check else dict(checks=0, failures=[], worst_bf16_rel_err=0.0)
    save()
    if device == "cuda":
        result["graph_check"] = graph_check(device)
        save()
    if args.sweep and device == "cuda":
        result["sweep"] = sweep(device)
        save()
    print(HEADER, flush=True)

    def save_rows(timing):
        result["timings"] = timing
        save()
    try:
        timings(grid, device, save_rows, args.deadline_s, start)
    except KeyboardInterrupt:  # the driver's timeout: keep what was measured
        result.setdefault("timings", dict(bandwidth=float("nan"), launch_us=float("nan"),
                                          rows=[]))["truncated"] = True
        save()
        print("timings interrupted: partial rows saved", flush=True)
    print(f"total {time.perf_counter() - start:.0f}s", flush=True)
    print(render(result))


if __name__ == "__main__":
    main()
