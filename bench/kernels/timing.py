"""Timings by CUDA-graph replay: our kernels, the torch baselines and the base linear layer."""

from __future__ import annotations

import time

import torch

from bench.kernels.grid import (
    DECODE_MAX_TOKENS,
    case_key,
    combos_for,
    floor_bytes,
    make_inputs,
    pick_ours,
)
from bench.kernels.render import format_row
from bench.timing import graph_time_us


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
    if t <= DECODE_MAX_TOKENS:  # plain once more, last: the spread between equal versions
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
        rows.sort(key=lambda r: grid.index(case_key(r)))
        print(format_row(row, one_launch), flush=True)
        save_rows(out)
        torch.cuda.empty_cache() if device == "cuda" else None
    return out
