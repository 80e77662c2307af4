"""Probe: a one-launch decode kernel without a barrier ("last arriver"), against our pair.

Question (bench/kernels_notes.md, run 9): can one launch beat the shrink+expand pair at decode
sizes if no program ever waits? Grid = tiles x N blocks x K splits. Program (tile, nb, ks)
shrinks K chunk ks for its tile (the A chunk is read once per N block: redundant, from L2),
stores the fp32 partial, and bumps the (tile, nb) counter; the program that arrives last sums
the partials and expands its BLOCK_N columns. No spinning, so no co-residency assumption; the
cost is the redundant A traffic (num_nb x A bytes through L2) and one atomic round trip on
the critical path. Compared in the same CUDA-graph replay timing as bench/kernels/ against
kernels.add_lora (what the host rule picks: our pair or fused) at decode shapes.

Run: python3 -m bench.decode_probe [--out probe.json]   (CUDA; TRITON_INTERPRET=1 on CPU
checks correctness on small shapes only).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench.kernels.grid import make_inputs as inputs
from kernels import add_lora, build_meta, reference
from kernels.triton_kernels import _delta, _load_b, _shrink_tile, _tile_rows

BLOCK_M = 16


@triton.jit
def last_arriver_kernel(x_ptr, a_ptr, b_ptr, y_ptr, ws_ptr, count_ptr, rec_ptr, N, K, R,
                        num_nb, num_ks, stride_xm, stride_ym, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_UPCAST: tl.constexpr):
    # x: [T, K]; a: [S, R, K]; b: [S, N, R]; y: [T, N]
    # ws: [groups, num_ks, BLOCK_M, BLOCK_R] float32; count: [groups] int32 zeros
    pid = tl.program_id(0)
    ks = pid % num_ks
    nb = (pid // num_ks) % num_nb
    tile = pid // (num_ks * num_nb)
    slot, tokens, mask_m = _tile_rows(rec_ptr, rec_ptr, rec_ptr, rec_ptr, tile, BLOCK_M, True)
    if slot < 0:
        return
    k_chunk = tl.cdiv(tl.cdiv(K, num_ks), BLOCK_K) * BLOCK_K
    k_lo = ks * k_chunk
    acc = _shrink_tile(x_ptr, a_ptr, tokens, mask_m, slot, k_lo, tl.minimum(k_lo + k_chunk, K),
                       K, R, stride_xm, BLOCK_M, BLOCK_R, BLOCK_K, DOT_UPCAST)
    group = tile * num_nb + nb
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
    ws_group = ws_ptr + group.to(tl.int64) * num_ks * BLOCK_M * BLOCK_R
    tl.store(ws_group + ks * BLOCK_M * BLOCK_R + offs, acc)
    n_lo = nb * BLOCK_N
    bt = _load_b(b_ptr, slot, n_lo, N, R, BLOCK_N, BLOCK_R)  # in flight across the atomic
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + group, 1, sem="acq_rel", scope="gpu")
    if arrived == num_ks - 1:  # last of the group: every partial is visible
        tl.atomic_xchg(count_ptr + group, 0, sem="relaxed", scope="gpu")
        buf = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for p in range(num_ks):
            buf += tl.load(ws_group + p * BLOCK_M * BLOCK_R + offs, cache_modifier=".cg")
        delta = _delta(buf, bt, DOT_UPCAST)
        offs_n = n_lo + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n < N)[None, :]
        y_ptrs = y_ptr + tokens[:, None] * stride_ym + offs_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


def make_probe(x, lora_a, lora_b, y, meta, block_n, num_ks, block_k, num_warps):
    """A closure launching the probe kernel for these tensors (buffers allocated once)."""
    rank, k, n = lora_a.shape[1], x.shape[1], lora_b.shape[1]
    records = meta.tile_records(BLOCK_M)
    num_tiles, num_nb = records.shape[0], triton.cdiv(n, block_n)
    groups = num_tiles * num_nb
    block_r = max(16, triton.next_power_of_2(rank))
    ws = torch.empty(groups, num_ks, BLOCK_M, block_r, dtype=torch.float32, device=x.device)
    count = torch.zeros(groups, dtype=torch.int32, device=x.device)
    upcast = os.environ.get("TRITON_INTERPRET") == "1"

    def run():
        last_arriver_kernel[(groups * num_ks,)](
            x, lora_a, lora_b, y, ws, count, records, n, k, rank, num_nb, num_ks,
            x.stride(0), y.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k,
            BLOCK_N=block_n, DOT_UPCAST=upcast, num_warps=num_warps)
        return y
    return run


def check(config, shape, dtype, device) -> float:
    """Max relative error of three launches (counters must reset) against the reference."""
    k, n, rank, tokens, adapters = shape
    y, x, lora_a, lora_b, slot_ids = inputs(k, n, rank, tokens, adapters, dtype, device)
    meta = build_meta(slot_ids, adapters)
    want = reference.add_lora(y.clone().float(), x.float(), lora_a.float(), lora_b.float(),
                              slot_ids, 1.0)
    worst = 0.0
    for _ in range(3):
        out = y.clone()
        make_probe(x, lora_a, lora_b, out, meta, *config)()
        err = ((out.float() - want).abs().max() / want.abs().max()).item()
        worst = max(worst, err if err == err else float("inf"))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":  # interpreter: correctness only, small shapes
        for shape in [(64, 48, 8, 1, 1), (96, 40, 4, 5, 3), (64, 200, 16, 16, 8)]:
            for config in [(32, 2, 32, 4), (64, 3, 32, 4)]:
                err = check(config, shape, dtype, device)
                print(f"interpreter {shape} {config}: max rel err {err:.2e}")
                if not err < 1e-5:
                    raise SystemExit("probe kernel is wrong")
        return
    from bench.timing import graph_time_us

    shapes = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
    cases = [(k, n, r, t, a) for (k, n) in shapes for r in (16, 64)
             for (t, a) in ((1, 1), (16, 1), (16, 8), (64, 8))]
    configs = [(bn, ks, bk, w) for bn, ks, bk, w in itertools.product(
        (64, 128, 256), (2, 4, 8, 16), (64, 128), (4,))]
    rows = []
    for case in cases:
        k, n, rank, tokens, adapters = case
        y, x, lora_a, lora_b, slot_ids = inputs(k, n, rank, tokens, adapters, dtype, device)
        meta = build_meta(slot_ids, adapters)
        ours = graph_time_us(lambda: add_lora(y, x, lora_a, lora_b, slot_ids, meta=meta),
                             inner=20)
        best = None
        for config in configs:
            if triton.cdiv(k, config[1]) < config[2]:
                continue
            err = check(config, case, dtype, device)
            if not err < 2e-2:
                print(f"  FAIL {case} {config}: rel err {err:.2e}", flush=True)
                continue
            us = graph_time_us(make_probe(x, lora_a, lora_b, y, meta, *config), inner=20)
            if best is None or us < best[0]:
                best = (us, config)
        row = {"case": case, "ours_us": ours, "probe_us": best[0] if best else None,
               "probe_config": best[1] if best else None}
        rows.append(row)
        print(f"{k}->{n} r{rank} T{tokens} A{adapters}: ours {ours:.2f} us, last-arriver "
              f"{best[0]:.2f} us {best[1]} -> ours/probe {ours / best[0]:.2f}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(0), "rows": rows},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
