"""Host wrappers of the Triton multi-LoRA kernels: check, pick a launch config, launch.

Same signatures and numerics as kernels.reference. With a prebuilt `meta`, nothing here
synchronises with the GPU, so a whole forward pass can be captured in a CUDA graph.
Every call is checked, then planned (a LoraPlan: configs, grids, tile arguments, workspace),
then launched; add_lora_planned, the engine's entry, keeps the checked plan in meta.plans and
only launches on later calls of the same signature (bench/host_overhead.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from kernels import checks, launch
from kernels.meta import MAX_PIECES, MIN_BLOCK_M, LoraBatchMeta, build_meta
from kernels.reference import checks_slices
from kernels.triton_kernels import expand_kernel, fused_kernel, shrink_kernel

PLAIN = launch.Variant()  # every switch off


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


@dataclass(eq=False)
class _Step:
    """One kernel launch, complete but for the call's own tensors (x, y, lora_a, lora_b) and
    scaling: grid, workspace (and barrier counters), trailing arguments, constexprs."""

    kernel: object
    grid: tuple
    buffers: tuple
    tail: tuple
    options: dict

    def launch(self, x, y, a, b, scale_ptr, scale_val) -> None:
        # a, b: the group's lora_a / lora_b slices, padded to MAX_PIECES
        if self.kernel is expand_kernel:
            expand_kernel[self.grid](*self.buffers, *b, y, *self.tail, **self.options)
        elif self.kernel is shrink_kernel:
            shrink_kernel[self.grid](x, *a, *self.buffers, scale_ptr, scale_val, *self.tail,
                                     **self.options)
        else:
            fused_kernel[self.grid](x, *a, *b, y, *self.buffers, scale_ptr, scale_val,
                                    *self.tail, **self.options)


def _shrink_step(x, lora_as, has_scale, meta, variant=PLAIN, ws=None) -> _Step:
    """Writes ws [split_k, T, pieces * R] float32 partial sums of scaling * x @ a_i.T."""
    # x: [T, K] row-major (T <= meta.num_tokens), lora_as[i]: [S, R, K]
    num_tokens, hidden_in = meta.num_tokens, x.shape[1]
    rank, pieces = lora_as[0].shape[1], len(lora_as)
    gpu, num_sms = launch.device_key(x.device)
    gpu = variant.config_name(gpu)
    cfg = launch.shrink_launch(gpu, num_sms, num_tokens, meta.num_slots, hidden_in, rank, pieces)
    if ws is None:
        ws = torch.empty(cfg.split_k, num_tokens, pieces * rank, dtype=torch.float32,
                         device=x.device)
    cfg = dataclasses.replace(cfg, split_k=ws.shape[0])
    tiles = _tiles(meta, cfg.block_m, variant.records)
    rank_block = launch.shrink_block_r(cfg, rank)
    grid = (_num_tiles(tiles), cfg.split_k * triton.cdiv(rank, rank_block), pieces)
    tail = (*tiles, hidden_in, rank, cfg.split_k, x.stride(0), ws.stride(0), ws.stride(1))
    options = dict(HAS_SCALE_TENSOR=has_scale, BLOCK_M=cfg.block_m,
                   BLOCK_R=rank_block, BLOCK_K=cfg.block_k,
                   DOT_UPCAST=_dot_upcast(x), RECORDS=variant.records,
                   GDC=bool(_pdl(variant, x.device)),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _Step(shrink_kernel, grid, (ws,), tail, options)


def _expand_step(y, ws, lora_bs, offsets, meta, variant=PLAIN) -> _Step:
    """y[:, off_i : off_i + N_i] += sum_split(ws)[:, i*R:(i+1)*R] @ b_i.T."""
    # y: [T, width] row-major, ws: [split, T, pieces * R], lora_bs[i]: [S, N_i, R]
    num_tokens = meta.num_tokens
    rank = lora_bs[0].shape[2]
    widths = [b.shape[1] for b in lora_bs]
    gpu, _ = launch.device_key(y.device)
    cfg = launch.expand_launch(variant.config_name(gpu), num_tokens, max(widths), rank)
    n, off = _padded(widths, 0), _padded(list(offsets), 0)
    tiles = _tiles(meta, cfg.block_m, variant.records)
    grid = (_num_tiles(tiles), triton.cdiv(max(widths), cfg.block_n), len(lora_bs))
    pdl = _pdl(variant, y.device)
    tail = (*n, *off, *tiles, rank, ws.shape[0], ws.stride(0), ws.stride(1), y.stride(0))
    options = dict(BLOCK_M=cfg.block_m, BLOCK_R=launch.block_r(rank), BLOCK_N=cfg.block_n,
                   DOT_UPCAST=any(_dot_upcast(t) for t in lora_bs),
                   RECORDS=variant.records, PDL=variant.pdl, GDC=bool(pdl),
                   UNROLL=launch.sum_unroll(cfg, ws.shape[0]), B_FIRST=bool(cfg.b_first),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl)
    return _Step(expand_kernel, grid, (ws,), tail, options)


def _fused_steps(y, x, lora_as, lora_bs, offsets, has_scale, meta, variant=PLAIN) -> list[_Step]:
    """One launch: per tile, split-K shrink into ws, per-tile barrier, split-N expand."""
    # y: [T, width], x: [T, K] row-major, lora_as[i]: [S, R, K], lora_bs[i]: [S, N_i, R]
    num_tokens, hidden_in = meta.num_tokens, x.shape[1]
    rank, pieces = lora_as[0].shape[1], len(lora_as)
    widths = [b.shape[1] for b in lora_bs]
    gpu, num_sms = launch.device_key(x.device)
    cfg = launch.fused_launch(variant.config_name(gpu), num_sms, num_tokens, meta.num_slots,
                              hidden_in, max(widths), rank, pieces)
    if cfg.block_m < MIN_BLOCK_M:
        raise ValueError(f"fused block_m must be >= {MIN_BLOCK_M}, got {cfg.block_m}")
    n, off = _padded(widths, 0), _padded(list(offsets), 0)
    tiles = _tiles(meta, cfg.block_m, variant.records)
    num_tiles = _num_tiles(tiles)
    ws = torch.empty(cfg.split_k, num_tokens, pieces * rank, dtype=torch.float32,
                     device=x.device)
    tail = (*n, *off, *tiles, hidden_in, rank, cfg.split_k, num_tiles, x.stride(0),
            y.stride(0), ws.stride(0), ws.stride(1))
    options = dict(HAS_SCALE_TENSOR=has_scale, BLOCK_M=cfg.block_m,
                   BLOCK_R=launch.block_r(rank), BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n,
                   DOT_UPCAST=any(_dot_upcast(t) for t in [x, *lora_bs]),
                   RECORDS=variant.records, UNROLL=launch.sum_unroll(cfg, cfg.split_k),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    # Under the interpreter programs run one after another: a barrier would wait forever.
    phases = (1, 2) if os.environ.get("TRITON_INTERPRET") == "1" else (0,)
    grid = (num_tiles * cfg.split_k, pieces)
    return [_Step(fused_kernel, grid, (ws, meta.counters), tail, dict(options, PHASE=phase))
            for phase in phases]


@dataclass(eq=False)
class LoraPlan:
    """The launches of one call signature on one batch, built once (launch configs, variant,
    grids, tile arguments, workspaces) and replayed with each call's tensors.

    groups: (slice of the lora_a / lora_b lists, steps) per launch group of <= MAX_PIECES
    slices. copy_x: x is not row-major and is copied per call, as add_lora does.
    """

    groups: list
    copy_x: bool = False

    def run(self, y, x, lora_as, lora_bs, scaling) -> None:
        # y: [T, width] row-major, x: [T, K], lora_as[i]: [S, R, K], lora_bs[i]: [S, N_i, R]
        if self.copy_x:
            x = x.contiguous()
        scale_ptr, scale_val, _ = _scale_args(scaling, x)
        for group, steps in self.groups:
            a_group, b_group = lora_as[group], lora_bs[group]
            a, b = _padded(a_group, a_group[0]), _padded(b_group, b_group[0])
            for step in steps:
                step.launch(x, y, a, b, scale_ptr, scale_val)


def _plan(y, x, lora_as, lora_bs, scaling, meta, fused=None, variant=None) -> LoraPlan:
    """Launches of add_lora / add_lora_slices on validated inputs with num_tokens > 0 (x, y
    row-major, weights contiguous). fused / variant: None = the GPU table's host rules
    (launch.use_fused, pick_variant)."""
    offsets = [0]
    for b in lora_bs[:-1]:
        offsets.append(offsets[-1] + b.shape[1])
    gpu, _ = launch.device_key(x.device)
    shape = (meta.num_tokens, meta.num_slots, lora_as[0].shape[1], x.shape[1])
    if isinstance(variant, str):
        variant = launch.Variant.parse(variant)
    variant = variant or launch.pick_variant(gpu, *shape)
    if fused is None:
        fused = launch.use_fused(variant.config_name(gpu), *shape)
    has_scale = isinstance(scaling, torch.Tensor)
    groups = []
    for lo in range(0, len(lora_as), MAX_PIECES):
        group = slice(lo, lo + MAX_PIECES)
        if fused:
            steps = _fused_steps(y, x, lora_as[group], lora_bs[group], offsets[group],
                                 has_scale, meta, variant)
        else:
            shrink = _shrink_step(x, lora_as[group], has_scale, meta, variant)
            steps = [shrink, _expand_step(y, shrink.buffers[0], lora_bs[group], offsets[group],
                                          meta, variant)]
        groups.append((group, steps))
    return LoraPlan(groups)


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
    """Shared body of add_lora / add_lora_slices: check, plan, launch (every call)."""
    num_slots = _check_pieces(y, x, lora_as, lora_bs, slot_ids, scaling)
    meta = _meta(meta, slot_ids, x.shape[0], num_slots, x.device)
    if x.shape[0] == 0:
        return y
    x, y_rm = _row_major(x, "x"), _row_major(y, "y")
    lora_as = [a.contiguous() for a in lora_as]
    lora_bs = [b.contiguous() for b in lora_bs]
    _plan(y_rm, x, lora_as, lora_bs, scaling, meta, fused, variant).run(
        y_rm, x, lora_as, lora_bs, scaling)
    return y


def _check_width(y, lora_b) -> None:
    if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 and isinstance(y, torch.Tensor) \
            and y.dim() == 2 and lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b hidden_out {lora_b.shape[1]} != y width {y.shape[1]}")


def add_lora(y, x, lora_a, lora_b, slot_ids, scaling=1.0, *, meta=None, fused=None,
             variant=None):
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R]
    _check_width(y, lora_b)
    return _apply(y, x, [lora_a], [lora_b], slot_ids, scaling, meta, fused, variant)


def add_lora_slices(y, x, lora_a_slices, lora_b_slices, slot_ids, scaling=1.0, *, meta=None,
                    fused=None, variant=None):
    # y: [T, sum N_i], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    checks_slices(y, lora_a_slices, lora_b_slices)
    return _apply(y, x, list(lora_a_slices), list(lora_b_slices), slot_ids, scaling, meta, fused,
                  variant)


def add_lora_planned(y, x, lora_a, lora_b, meta: LoraBatchMeta, *, fused=None) -> torch.Tensor:
    """add_lora(y, x, lora_a, lora_b, meta.slot_ids, meta=meta) at scaling 1, for an engine's
    per-layer hot path: the first call of each signature (shapes, strides, dtypes, device) on
    this meta runs add_lora's checks and builds a LoraPlan, kept in meta.plans; later calls only
    launch it. Same kernels, configs and arguments as add_lora, so the same bits. lora_a and
    lora_b must be contiguous (slot buffers); one stream at a time per meta (the workspace of a
    signature is shared by its calls). fused: None = the GPU table's host rule; True/False
    forces the one-launch fused kernel or the shrink+expand pair (part of the plan's key)."""
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R]
    try:
        key = (x.shape, x.stride(), y.shape, y.stride(), lora_a.shape, lora_a.stride(),
               lora_b.shape, lora_b.stride(), x.dtype, y.dtype, lora_a.dtype, lora_b.dtype,
               x.device, fused)
        plan = meta.plans.get(key)
    except AttributeError:  # not tensors or not a meta: the checks say what is wrong
        key = plan = None
    if plan is None:
        plan = meta.plans[key] = _checked_plan(y, x, lora_a, lora_b, meta, fused)
    plan.run(y, x, [lora_a], [lora_b], 1.0)
    return y


def _checked_plan(y, x, lora_a, lora_b, meta: LoraBatchMeta, fused=None) -> LoraPlan:
    """add_lora's checks, then the plan of one call (no launches when num_tokens is 0)."""
    if not isinstance(meta, LoraBatchMeta):
        raise TypeError(f"meta must be a LoraBatchMeta from build_meta, got {type(meta)}")
    _check_width(y, lora_b)
    num_slots = _check_pieces(y, x, [lora_a], [lora_b], meta.slot_ids, 1.0)
    _meta(meta, meta.slot_ids, x.shape[0], num_slots, x.device)
    if not (lora_a.is_contiguous() and lora_b.is_contiguous()):
        raise ValueError("add_lora_planned needs contiguous lora_a and lora_b (slot buffers)")
    x_rm, y_rm = _row_major(x, "x"), _row_major(y, "y")
    if x.shape[0] == 0:
        return LoraPlan([])
    plan = _plan(y_rm, x_rm, [lora_a], [lora_b], 1.0, meta, fused)
    plan.copy_x = x_rm is not x
    return plan


def add_lora_slices_planned(y, x, lora_a_slices, lora_b_slices, meta: LoraBatchMeta,
                            scaling: float = 1.0, *, fused=None) -> torch.Tensor:
    """add_lora_slices(y, x, lora_a_slices, lora_b_slices, meta.slot_ids, scaling, meta=meta)
    with add_lora_planned's caching: the first call of each signature on this meta is checked
    and planned, later calls only launch. The fused q/k/v and gate/up projections of an
    engine that owns the metadata (a vLLM punica wrapper). Slices must be contiguous.

    x and y may have fewer rows than the meta has tokens when the meta's tokens past them
    are all slot -1 (a StepMeta prefix: the caller's contract, not checked on the device):
    one plan then serves every row count up to meta.num_tokens, as an engine's eager steps
    of varying size need (a plan and its workspace per distinct size would be rebuilt and
    kept for each)."""
    # y: [T, sum N_i], x: [T, K], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    try:
        if x.shape[0] == 0:
            return y
        key = (x.shape[1:], x.stride(), y.shape[1:], y.stride(), x.dtype, y.dtype, x.device,
               fused, isinstance(scaling, torch.Tensor),
               *((a.shape, a.stride(), a.dtype) for a in lora_a_slices),
               *((b.shape, b.stride(), b.dtype) for b in lora_b_slices))
        plan = meta.plans.get(key)
        if plan is not None and x.shape[0] > meta.num_tokens:
            plan = None  # more rows than the meta: the checks say so
    except (AttributeError, TypeError):  # not tensors or not a meta: the checks say what
        key = plan = None
    if plan is None:
        plan = _checked_slices_plan(y, x, list(lora_a_slices), list(lora_b_slices), meta,
                                    scaling, fused)
        if key is not None:
            meta.plans[key] = plan
    plan.run(y, x, list(lora_a_slices), list(lora_b_slices), scaling)
    return y


def _checked_slices_plan(y, x, lora_as, lora_bs, meta, scaling, fused) -> LoraPlan:
    if not isinstance(meta, LoraBatchMeta):
        raise TypeError(f"meta must be a LoraBatchMeta from build_meta, got {type(meta)}")
    checks_slices(y, lora_as, lora_bs)
    rows = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else None
    if rows is not None and rows > meta.num_tokens:
        raise ValueError(f"x has {rows} rows, meta was built for {meta.num_tokens} tokens")
    slot_ids = meta.slot_ids[:rows] if rows is not None else meta.slot_ids
    num_slots = _check_pieces(y, x, lora_as, lora_bs, slot_ids, scaling)
    _meta(meta, meta.slot_ids, meta.num_tokens, num_slots, x.device)
    if not all(t.is_contiguous() for t in [*lora_as, *lora_bs]):
        raise ValueError("add_lora_slices_planned needs contiguous lora_a and lora_b slices")
    x_rm, y_rm = _row_major(x, "x"), _row_major(y, "y")
    if x.shape[0] == 0:
        return LoraPlan([])
    plan = _plan(y_rm, x_rm, lora_as, lora_bs, scaling, meta, fused)
    plan.copy_x = x_rm is not x
    return plan


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
    lora_as = [lora_a.contiguous()]
    step = _shrink_step(x, lora_as, isinstance(scaling, torch.Tensor), meta, ws=ws)
    scale_ptr, scale_val, _ = _scale_args(scaling, x)
    step.launch(x, None, _padded(lora_as, lora_as[0]), None, scale_ptr, scale_val)
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
    y_rm, lora_bs = _row_major(y, "y"), [lora_b.contiguous()]
    step = _expand_step(y_rm, ws, lora_bs, [offset], meta)
    step.launch(None, y_rm, None, _padded(lora_bs, lora_bs[0]), None, None)
    return y
