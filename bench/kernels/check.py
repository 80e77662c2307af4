"""Correctness on the GPU before timing: every combo against the torch reference over the grid
(in worker processes), and 3 replays of a captured add_lora against 3 reference applications."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

import torch

from bench.kernels.grid import (
    CANDIDATE,
    COMBOS,
    DECODE_MAX_TOKENS,
    FUSED_MAX_TOKENS,
    combos_for,
    make_inputs,
)


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
    """Replaying a captured add_lora 3 times equals 3 reference applications, for plain and every
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
