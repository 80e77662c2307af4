"""Host wrappers of the Triton multi-LoRA kernels: check, pick a launch config, launch.

Same signatures and numerics as kernels.reference. With a prebuilt `meta`, nothing here
synchronises with the GPU, so a whole forward pass can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from kernels import checks, launch
from kernels.meta import MAX_PIECES, MIN_BLOCK_M, LoraBatchMeta, build_meta
from kernels.reference import checks_slices
from kernels.triton_kernels import expand_kernel, fused_kernel, shrink_kernel

V2 = launch.Variant()


def _meta(meta: LoraBatchMeta | None, slot_ids, num_tokens, num_slots, device) -> LoraBatchMeta:
    checks.check_slot_ids(slot_ids, num_tokens, device)
    if meta is None:
        return build_meta(slot_ids, num_slots)
    checks.check_meta(meta, num_tokens, num_slots, device)
    return meta


def _scale_args(scaling, ref: torch.Tensor):
    if isinstance(scaling, torch.Tensor):
        return scaling.contiguous(), 1.0, True
    return ref, float(scaling), False


def _row_major(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(1) == 1:
        return t
    if name == "y":
        raise ValueError("y must have unit stride along its last dimension (updated in place)")
    return t.contiguous()


def _dot_upcast(t: torch.Tensor) -> bool:
    """The interpreter's tl.dot mishandles bfloat16 (triton 3.9): upcast there only."""
    return t.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _padded(items: list, fill) -> list:
    return items + [fill] * (MAX_PIECES - len(items))


def _tiles(meta: LoraBatchMeta, block_m: int, records: bool):
    """The kernels' four tile arguments: (sorted, tile_slot, tile_start, slot_end), or the
    record table four times (RECORDS reads only the second)."""
    if records:
        return (meta.tile_records(block_m),) * 4
    tile_slot, tile_start = meta.tile_map(block_m)
    return meta.sorted_tokens, tile_slot, tile_start, meta.slot_end


def _num_tiles(tiles) -> int:
    return tiles[1].shape[0]


def _pdl(variant: launch.Variant, device: torch.device) -> dict:
    """Launch option and GDC flag of a PDL launch (none where griddepcontrol is unavailable)."""
    return dict(launch_pdl=True) if variant.pdl and launch.pdl_supported(device) else {}


def _shrink(x, lora_as, scaling, meta, ws=None, variant=V2) -> torch.Tensor:
    """ws [split_k, T, pieces * R] float32 partial sums of scaling * x @ a_i.T."""
    # x: [T, K], lora_as[i]: [S, R, K]
    num_tokens, hidden_in = x.shape
    rank, pieces = lora_as[0].shape[1], len(lora_as)
    gpu, num_sms = launch.device_key(x.device)
    gpu = variant.config_name(gpu)
    cfg = launch.shrink_launch(gpu, num_sms, num_tokens, meta.num_slots, hidden_in, rank, pieces)
    if ws is None:
        ws = torch.empty(cfg.split_k, num_tokens, pieces * rank, dtype=torch.float32,
                         device=x.device)
    cfg = dataclasses.replace(cfg, split_k=ws.shape[0])
    scale_ptr, scale_val, has_scale = _scale_args(scaling, x)
    a = _padded(lora_as, lora_as[0])
    tiles = _tiles(meta, cfg.block_m, variant.records)
    grid = (_num_tiles(tiles), cfg.split_k, pieces)
    shrink_kernel[grid](x, a[0], a[1], a[2], ws, scale_ptr, scale_val, *tiles,
                        hidden_in, rank, cfg.split_k, x.stride(0), ws.stride(0), ws.stride(1),
                        HAS_SCALE_TENSOR=has_scale, BLOCK_M=cfg.block_m,
                        BLOCK_R=launch.block_r(rank), BLOCK_K=cfg.block_k,
                        DOT_UPCAST=_dot_upcast(x), RECORDS=variant.records,
                        GDC=bool(_pdl(variant, x.device)),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return ws


def _expand(y, ws, lora_bs, offsets, meta, variant=V2) -> None:
    """y[:, off_i : off_i + N_i] += sum_split(ws)[:, i*R:(i+1)*R] @ b_i.T."""
    # y: [T, width], ws: [split, T, pieces * R], lora_bs[i]: [S, N_i, R]
    num_tokens = y.shape[0]
    rank = lora_bs[0].shape[2]
    widths = [b.shape[1] for b in lora_bs]
    gpu, _ = launch.device_key(y.device)
    cfg = launch.expand_launch(variant.config_name(gpu), num_tokens, max(widths), rank)
    b = _padded(lora_bs, lora_bs[0])
    n, off = _padded(widths, 0), _padded(list(offsets), 0)
    tiles = _tiles(meta, cfg.block_m, variant.records)
    grid = (_num_tiles(tiles), triton.cdiv(max(widths), cfg.block_n), len(lora_bs))
    pdl = _pdl(variant, y.device)
    expand_kernel[grid](ws, b[0], b[1], b[2], y, *n, *off, *tiles,
                        rank, ws.shape[0], ws.stride(0), ws.stride(1), y.stride(0),
                        BLOCK_M=cfg.block_m, BLOCK_R=launch.block_r(rank), BLOCK_N=cfg.block_n,
                        DOT_UPCAST=any(_dot_upcast(t) for t in lora_bs),
                        RECORDS=variant.records, PDL=variant.pdl, GDC=bool(pdl),
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)


def _fused(y, x, lora_as, lora_bs, offsets, scaling, meta, variant=V2) -> None:
    """One launch: per tile, split-K shrink into ws, per-tile barrier, split-N expand."""
    # y: [T, width], x: [T, K], lora_as[i]: [S, R, K], lora_bs[i]: [S, N_i, R]
    num_tokens, hidden_in = x.shape
    rank, pieces = lora_as[0].shape[1], len(lora_as)
    widths = [b.shape[1] for b in lora_bs]
    gpu, num_sms = launch.device_key(x.device)
    cfg = launch.fused_launch(variant.config_name(gpu), num_sms, num_tokens, meta.num_slots,
                              hidden_in, max(widths), rank, pieces)
    if cfg.block_m < MIN_BLOCK_M:
        raise ValueError(f"fused block_m must be >= {MIN_BLOCK_M}, got {cfg.block_m}")
    scale_ptr, scale_val, has_scale = _scale_args(scaling, x)
    a, b = _padded(lora_as, lora_as[0]), _padded(lora_bs, lora_bs[0])
    n, off = _padded(widths, 0), _padded(list(offsets), 0)
    tiles = _tiles(meta, cfg.block_m, variant.records)
    num_tiles = _num_tiles(tiles)
    ws = torch.empty(cfg.split_k, num_tokens, pieces * rank, dtype=torch.float32,
                     device=x.device)
    # Under the interpreter programs run one after another: a barrier would wait forever.
    phases = (1, 2) if os.environ.get("TRITON_INTERPRET") == "1" else (0,)
    for phase in phases:
        fused_kernel[(num_tiles * cfg.split_k, pieces)](
            x, a[0], a[1], a[2], b[0], b[1], b[2], y, ws, meta.counters, scale_ptr, scale_val,
            *n, *off, *tiles, hidden_in, rank, cfg.split_k, num_tiles, x.stride(0), y.stride(0),
            ws.stride(0), ws.stride(1), HAS_SCALE_TENSOR=has_scale, BLOCK_M=cfg.block_m,
            BLOCK_R=launch.block_r(rank), BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, PHASE=phase,
            DOT_UPCAST=any(_dot_upcast(t) for t in [x, *lora_bs]), RECORDS=variant.records,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _check_pieces(y, x, lora_as, lora_bs, slot_ids, scaling):
    checks.check_matrix("x", x)
    checks.check_matrix("y", y, rows=x.shape[0])
    num_slots, rank = checks.check_lora_a(lora_as[0], x)
    for i, (lora_a, lora_b) in enumerate(zip(lora_as, lora_bs)):
        if lora_a.shape != lora_as[0].shape or lora_a.dtype != x.dtype:
            raise ValueError(f"lora_a slice {i} {tuple(lora_a.shape)} {lora_a.dtype} differs "
                             f"from slice 0 {tuple(lora_as[0].shape)} {x.dtype}")
        checks.check_lora_a(lora_a, x)
        checks.check_lora_b(lora_b, num_slots, rank, x)
    checks.check_scaling(scaling, num_slots, x.device)
    checks.check_slot_ids(slot_ids, x.shape[0], x.device)
    return num_slots


def _apply(y, x, lora_as, lora_bs, slot_ids, scaling, meta, fused=None,
           variant=None) -> torch.Tensor:
    """Shared body of add_lora / add_lora_slices: groups of up to 3 slices per launch.
    fused / variant: None = the GPU table's host rules (launch.use_fused, pick_variant)."""
    num_slots = _check_pieces(y, x, lora_as, lora_bs, slot_ids, scaling)
    meta = _meta(meta, slot_ids, x.shape[0], num_slots, x.device)
    if x.shape[0] == 0:
        return y
    x, y_rm = _row_major(x, "x"), _row_major(y, "y")
    lora_as = [a.contiguous() for a in lora_as]
    lora_bs = [b.contiguous() for b in lora_bs]
    offsets = [0]
    for b in lora_bs[:-1]:
        offsets.append(offsets[-1] + b.shape[1])
    gpu, _ = launch.device_key(x.device)
    shape = (x.shape[0], meta.num_slots, lora_as[0].shape[1], x.shape[1])
    if isinstance(variant, str):
        variant = launch.Variant.parse(variant)
    variant = variant or launch.pick_variant(gpu, *shape)
    if fused is None:
        fused = launch.use_fused(variant.config_name(gpu), *shape)
    for lo in range(0, len(lora_as), MAX_PIECES):
        group = slice(lo, lo + MAX_PIECES)
        if fused:
            _fused(y_rm, x, lora_as[group], lora_bs[group], offsets[group], scaling, meta,
                   variant)
        else:
            ws = _shrink(x, lora_as[group], scaling, meta, variant=variant)
            _expand(y_rm, ws, lora_bs[group], offsets[group], meta, variant)
    return y


def add_lora(y, x, lora_a, lora_b, slot_ids, scaling=1.0, *, meta=None, fused=None,
             variant=None):
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R]
    if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 and isinstance(y, torch.Tensor) \
            and y.dim() == 2 and lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b hidden_out {lora_b.shape[1]} != y width {y.shape[1]}")
    return _apply(y, x, [lora_a], [lora_b], slot_ids, scaling, meta, fused, variant)


def add_lora_slices(y, x, lora_a_slices, lora_b_slices, slot_ids, scaling=1.0, *, meta=None,
                    fused=None, variant=None):
    # y: [T, sum N_i], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    checks_slices(y, lora_a_slices, lora_b_slices)
    return _apply(y, x, list(lora_a_slices), list(lora_b_slices), slot_ids, scaling, meta, fused,
                  variant)


def lora_shrink(x, lora_a, slot_ids, scaling=1.0, *, meta=None):
    # x: [T, K], lora_a: [S, R, K] -> buf: [T, R] float32 (0 for rows with slot -1)
    checks.check_matrix("x", x)
    num_slots, rank = checks.check_lora_a(lora_a, x)
    checks.check_scaling(scaling, num_slots, x.device)
    meta = _meta(meta, slot_ids, x.shape[0], num_slots, x.device)
    if x.shape[0] == 0:
        return torch.zeros(0, rank, dtype=torch.float32, device=x.device)
    x = _row_major(x, "x")
    gpu, num_sms = launch.device_key(x.device)
    cfg = launch.shrink_launch(gpu, num_sms, x.shape[0], num_slots, x.shape[1], rank, 1)
    ws = torch.zeros(cfg.split_k, x.shape[0], rank, dtype=torch.float32, device=x.device)
    _shrink(x, [lora_a.contiguous()], scaling, meta, ws=ws)
    return ws[0] if cfg.split_k == 1 else ws.sum(0)


def lora_expand(y, buf, lora_b, slot_ids, *, meta=None, offset=0):
    # y: [T, width], buf: [T, R] float32, lora_b: [S, N, R]
    checks.check_matrix("y", y)
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3:
        raise ValueError("lora_b must be [num_slots, hidden_out, rank]")
    num_slots, hidden_out, rank = lora_b.shape
    checks.check_lora_b(lora_b, num_slots, rank, y)
    checks.check_buf(buf, y.shape[0], rank)
    checks.check_out_range(y, offset, hidden_out)
    meta = _meta(meta, slot_ids, y.shape[0], num_slots, y.device)
    if y.shape[0] == 0:
        return y
    ws = buf.contiguous().unsqueeze(0)
    _expand(_row_major(y, "y"), ws, [lora_b.contiguous()], [offset], meta)
    return y
