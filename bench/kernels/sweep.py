"""Time candidate launch configs per op on representative shapes (`--sweep`)."""

from __future__ import annotations

import dataclasses

import torch

from bench.kernels.grid import make_inputs
from bench.kernels.timing import time_us

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
