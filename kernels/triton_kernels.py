"""Triton kernels for batched multi-LoRA: segmented shrink, expand, and fused shrink+expand.

Every kernel walks "tiles": blocks of <= BLOCK_M tokens that share one slot (LoraBatchMeta.
tile_map). Grid axis 0 is the tile (unused tiles, slot -1, return at once: the grid size is a
fixed bound, which keeps launches CUDA-graph safe), the last axis the output slice (fused
q/k/v or gate/up, up to 3 slices per launch). Tokens are gathered through sorted_tokens, so rows of y
whose slot is -1 are never read or written. Weights are contiguous:
lora_a [S, R, K] and lora_b_i [S, N_i, R].

Variants (kernels.launch.Variant, constexpr flags, plain = all off):
- RECORDS: the tile prologue reads one record row (token ids + slot, LoraBatchMeta.
  tile_records) instead of tile_slot/tile_start -> slot_end -> sorted_tokens: one dependent
  round trip instead of three. The host then passes the record table for all four tile args.
- PDL (unfused pair): the shrink lets the expand launch early (griddepcontrol); the expand
  loads its tile rows, B and y before waiting for the shrink, and only the split-K
  partials after. GDC emits the griddepcontrol instructions (compiled Hopper+ only; the
  interpreter runs the same PDL ordering without them).
"""

import triton
import triton.language as tl

MAX_SPINS = tl.constexpr(1 << 22)
RECORD_EXTRA = tl.constexpr(4)  # = kernels.meta.RECORD_EXTRA


@triton.jit
def _pick(i, v0, v1, v2):
    """v_i for a slice index i in 0..2 (scalars or pointers)."""
    if i == 0:
        v = v0
    elif i == 1:
        v = v1
    else:
        v = v2
    return v


@triton.jit
def _dot(a, b, DOT_UPCAST: tl.constexpr):
    """a @ b in float32 accumulation; DOT_UPCAST works around the interpreter's bf16 tl.dot."""
    if DOT_UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif a.dtype == tl.float32:
        out = tl.dot(a, b, input_precision="ieee")  # float32 inputs: no tf32 rounding
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _tile_rows(tile_slot_ptr, tile_start_ptr, slot_end_ptr, sorted_ptr, tile,
               BLOCK_M: tl.constexpr, RECORDS: tl.constexpr):
    """(slot, token indices [BLOCK_M], row mask) of one tile; slot < 0 for an unused tile.
    With RECORDS, tile_slot_ptr is the record table [tiles, BLOCK_M + RECORD_EXTRA]."""
    if RECORDS:
        row = tile_slot_ptr + tile.to(tl.int64) * (BLOCK_M + RECORD_EXTRA)
        slot = tl.load(row + BLOCK_M)
        ids = tl.load(row + tl.arange(0, BLOCK_M))  # same round trip as the slot
        mask_m = ids >= 0
        tokens = tl.maximum(ids, 0).to(tl.int64)
    else:
        slot = tl.load(tile_slot_ptr + tile)
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(slot_end_ptr + tl.maximum(slot, 0))
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end  # an unused tile (slot < 0) is skipped by the caller
        tokens = tl.load(sorted_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    return slot, tokens, mask_m


@triton.jit
def _shrink_tile(x_ptr, a_ptr, tokens, mask_m, slot, k_lo, k_hi, K, R, r_lo, stride_xm,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_UPCAST: tl.constexpr):
    """acc[m, r] = sum_{k in [k_lo, k_hi)} x[tokens[m], k] * a[slot, r_lo + r, k] (float32)."""
    offs_r = r_lo + tl.arange(0, BLOCK_R)
    a_base = a_ptr + slot.to(tl.int64) * R * K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        xt = tl.load(x_ptr + tokens[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_base + offs_r[None, :] * K + offs_k[:, None],
                     mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0)
        acc += _dot(xt, at, DOT_UPCAST)
    return acc


@triton.jit
def _scale_of(scale_ptr, scale_val, slot, HAS_SCALE_TENSOR: tl.constexpr):
    if HAS_SCALE_TENSOR:
        s = tl.load(scale_ptr + slot).to(tl.float32)
    else:
        s = scale_val
    return s


@triton.jit
def _load_b(b_ptr, slot, n_lo, N, R, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """[BLOCK_R, BLOCK_N] tile of b[slot, n_lo:n_lo+BLOCK_N, :].T (zeros outside)."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    b_base = b_ptr + slot.to(tl.int64) * N * R
    return tl.load(b_base + offs_n[None, :] * R + offs_r[:, None],
                   mask=(offs_n[None, :] < N) & (offs_r[:, None] < R), other=0.0)


@triton.jit
def _delta(buf, bt, DOT_UPCAST: tl.constexpr):
    """buf @ bt in float32; buf = hi + lo in B's dtype: two dots keep buf's float32 precision
    (the MMA is free here)."""
    if bt.dtype == tl.float32:
        delta = _dot(buf, bt, DOT_UPCAST)
    else:
        hi = buf.to(bt.dtype)
        lo = (buf - hi.to(tl.float32)).to(bt.dtype)
        delta = _dot(hi, bt, DOT_UPCAST) + _dot(lo, bt, DOT_UPCAST)
    return delta


@triton.jit
def _expand_tile(y_ptr, b_ptr, buf, tokens, mask_m, slot, n_lo, N, R, col_offset, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """y[tokens, col_offset + n] += buf @ b[slot, n, :].T for n in [n_lo, n_lo + BLOCK_N)."""
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    bt = _load_b(b_ptr, slot, n_lo, N, R, BLOCK_N, BLOCK_R)
    delta = _delta(buf, bt, DOT_UPCAST)
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + (col_offset + offs_n)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@triton.jit(do_not_specialize=["scale_val", "split_k"])
def shrink_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, ws_ptr, scale_ptr, scale_val,
                  sorted_ptr, tile_slot_ptr, tile_start_ptr, slot_end_ptr,
                  K, R, split_k, stride_xm, stride_ws_split, stride_ws_m,
                  HAS_SCALE_TENSOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_K: tl.constexpr, DOT_UPCAST: tl.constexpr, RECORDS: tl.constexpr,
                  GDC: tl.constexpr):
    # x: [T, K]; a_i: [S, R, K]; ws: [split_k, T, num_slices * R] float32 partial sums.
    # Grid (tiles, split_k * cdiv(R, BLOCK_R), pieces): each program one K chunk of one
    # BLOCK_R-wide block of rank columns (one block when BLOCK_R covers the rank).
    if GDC:
        tl.extra.cuda.gdc_launch_dependents()  # the expand may start its prologue now
    tile = tl.program_id(0)
    r_blocks = tl.cdiv(R, BLOCK_R)
    pid_k = tl.program_id(1) // r_blocks
    r_lo = (tl.program_id(1) % r_blocks) * BLOCK_R
    piece = tl.program_id(2)
    slot, tokens, mask_m = _tile_rows(tile_slot_ptr, tile_start_ptr, slot_end_ptr, sorted_ptr,
                                      tile, BLOCK_M, RECORDS)
    if slot < 0:
        return
    a_ptr = _pick(piece, a0_ptr, a1_ptr, a2_ptr)
    k_chunk = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = _shrink_tile(x_ptr, a_ptr, tokens, mask_m, slot, k_lo, k_hi, K, R, r_lo, stride_xm,
                       BLOCK_M, BLOCK_R, BLOCK_K, DOT_UPCAST)
    acc = acc * _scale_of(scale_ptr, scale_val, slot, HAS_SCALE_TENSOR)
    offs_r = r_lo + tl.arange(0, BLOCK_R)
    ws_ptrs = (ws_ptr + pid_k * stride_ws_split + tokens[:, None] * stride_ws_m
               + (piece * R + offs_r)[None, :])
    tl.store(ws_ptrs, acc, mask=mask_m[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sum_partials(ws_ptr, tokens, mask_m, piece, R, split_k, stride_ws_split, stride_ws_m,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, UNROLL: tl.constexpr,
                  CACHE: tl.constexpr):
    """The shrink's split-K partials of a tile's rows, summed in float32: [BLOCK_M, BLOCK_R].
    UNROLL partials are loaded per step, all issued before any is added: a rolled loop waits
    out one memory round trip per partial."""
    offs_r = tl.arange(0, BLOCK_R)
    ws_ptrs = ws_ptr + tokens[:, None] * stride_ws_m + (piece * R + offs_r)[None, :]
    mask_r = mask_m[:, None] & (offs_r[None, :] < R)
    buf = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if UNROLL == 1:
        for split in range(split_k):
            buf += tl.load(ws_ptrs + split * stride_ws_split, mask=mask_r, other=0.0,
                           cache_modifier=CACHE)
    else:
        for split in range(0, split_k, UNROLL):
            for u in tl.static_range(UNROLL):
                present = (offs_r[None, :] * 0 + split + u) < split_k  # a tensor (interpreter)
                buf += tl.load(ws_ptrs + (split + u) * stride_ws_split, mask=mask_r & present,
                               other=0.0, cache_modifier=CACHE)
    return buf


@triton.jit(do_not_specialize=["n0", "n1", "n2", "off0", "off1", "off2", "split_k"])
def expand_kernel(ws_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, n0, n1, n2, off0, off1, off2,
                  sorted_ptr, tile_slot_ptr, tile_start_ptr, slot_end_ptr,
                  R, split_k, stride_ws_split, stride_ws_m, stride_ym,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_UPCAST: tl.constexpr, RECORDS: tl.constexpr, PDL: tl.constexpr,
                  GDC: tl.constexpr, UNROLL: tl.constexpr, B_FIRST: tl.constexpr):
    # ws: [split_k, T, num_slices * R] float32; b_i: [S, N_i, R]; y: [T, width]
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    piece = tl.program_id(2)
    N = _pick(piece, n0, n1, n2)
    if not PDL:  # with PDL every program must wait for the shrink, idle ones too
        if pid_n * BLOCK_N >= N:
            return
    slot, tokens, mask_m = _tile_rows(tile_slot_ptr, tile_start_ptr, slot_end_ptr, sorted_ptr,
                                      tile, BLOCK_M, RECORDS)
    if not PDL:
        if slot < 0:
            return
    b_ptr = _pick(piece, b0_ptr, b1_ptr, b2_ptr)
    col_offset = _pick(piece, off0, off1, off2)
    if B_FIRST or PDL:
        _expand_b_first(ws_ptr, b_ptr, y_ptr, N, col_offset, slot, tokens, mask_m, pid_n,
                        piece, R, split_k, stride_ws_split, stride_ws_m, stride_ym, BLOCK_M,
                        BLOCK_R, BLOCK_N, DOT_UPCAST, GDC, UNROLL)
    else:
        buf = _sum_partials(ws_ptr, tokens, mask_m, piece, R, split_k, stride_ws_split,
                            stride_ws_m, BLOCK_M, BLOCK_R, UNROLL, "")
        _expand_tile(y_ptr, b_ptr, buf, tokens, mask_m, slot, pid_n * BLOCK_N, N, R,
                     col_offset, stride_ym, BLOCK_N, BLOCK_R, DOT_UPCAST)


@triton.jit
def _expand_b_first(ws_ptr, b_ptr, y_ptr, N, col_offset, slot, tokens, mask_m, pid_n, piece,
                    R, split_k, stride_ws_split, stride_ws_m, stride_ym, BLOCK_M: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DOT_UPCAST: tl.constexpr,
                    GDC: tl.constexpr, UNROLL: tl.constexpr):
    """expand_kernel's body with B and y, which the shrink does not write, loaded before the
    partials: their round trip overlaps the partials' at the cost of registers held through
    the sum (Launch.b_first). With PDL (GDC) they are loaded before the wait for the shrink,
    and every program gets here, idle ones too, so the expand never completes before it."""
    n_lo = pid_n * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_end = tl.where(slot >= 0, N, 0)  # an unused tile masks everything
    mask = mask_m[:, None] & (offs_n < n_end)[None, :]
    bt = _load_b(b_ptr, tl.maximum(slot, 0), n_lo, N, R, BLOCK_N, BLOCK_R)
    y_ptrs = y_ptr + tokens[:, None] * stride_ym + (col_offset + offs_n)[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    if GDC:
        tl.extra.cuda.gdc_wait()  # the shrink's partials are complete and visible
    if (slot >= 0) & (n_lo < N):
        buf = _sum_partials(ws_ptr, tokens, mask_m, piece, R, split_k, stride_ws_split,
                            stride_ws_m, BLOCK_M, BLOCK_R, UNROLL, "")
        delta = _delta(buf, bt, DOT_UPCAST)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=mask)


@triton.jit
def _tile_barrier(count_ptr, num_parts):
    """Wait until all num_parts programs of a tile have arrived; the last to leave resets.

    count_ptr[0] counts arrivals, count_ptr[1] departures; both are 0 between launches. Safe
    because a tile's programs are consecutive in launch order and far fewer than fit on the
    GPU at once, so every program waited on is already running or runs next.
    """
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr, 1, sem="release", scope="gpu") + 1
    spins = 0
    while (arrived < num_parts) & (spins < MAX_SPINS):  # bounded: a bug must not hang the GPU
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        spins += 1
    left = tl.atomic_add(count_ptr + 1, 1, sem="relaxed", scope="gpu")
    if left == num_parts - 1:
        tl.atomic_xchg(count_ptr + 1, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit(do_not_specialize=["scale_val", "n0", "n1", "n2", "off0", "off1", "off2",
                               "num_parts", "num_tiles"])
def fused_kernel(x_ptr, a0_ptr, a1_ptr, a2_ptr, b0_ptr, b1_ptr, b2_ptr, y_ptr, ws_ptr,
                 count_ptr, scale_ptr, scale_val, n0, n1, n2, off0, off1, off2,
                 sorted_ptr, tile_slot_ptr, tile_start_ptr, slot_end_ptr,
                 K, R, num_parts, num_tiles, stride_xm, stride_ym, stride_ws_split, stride_ws_m,
                 HAS_SCALE_TENSOR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PHASE: tl.constexpr,
                 DOT_UPCAST: tl.constexpr, RECORDS: tl.constexpr, UNROLL: tl.constexpr):
    # x: [T, K]; a_i: [S, R, K]; b_i: [S, N_i, R]; y: [T, width];
    # ws: [num_parts, T, pieces * R] float32; count: [pieces, max_tiles, 2] int32 (zeros).
    # Grid (num_tiles * num_parts, pieces): the num_parts programs of a tile each shrink one
    # K chunk into ws, meet at a per-tile barrier, then each expands one N chunk.
    # PHASE 0 = one launch; 1 / 2 = shrink / expand only (interpreter: programs run serially).
    part = tl.program_id(0) % num_parts
    tile = tl.program_id(0) // num_parts
    piece = tl.program_id(1)
    slot, tokens, mask_m = _tile_rows(tile_slot_ptr, tile_start_ptr, slot_end_ptr, sorted_ptr,
                                      tile, BLOCK_M, RECORDS)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    ws_rows = ws_ptr + tokens[:, None] * stride_ws_m + (piece * R + offs_r)[None, :]
    mask_r = mask_m[:, None] & (offs_r[None, :] < R)
    if PHASE != 2:
        a_ptr = _pick(piece, a0_ptr, a1_ptr, a2_ptr)
        k_chunk = tl.cdiv(tl.cdiv(K, num_parts), BLOCK_K) * BLOCK_K
        k_lo = part * k_chunk
        acc = _shrink_tile(x_ptr, a_ptr, tokens, mask_m, slot, k_lo,
                           tl.minimum(k_lo + k_chunk, K), K, R, 0, stride_xm,
                           BLOCK_M, BLOCK_R, BLOCK_K, DOT_UPCAST)
        acc = acc * _scale_of(scale_ptr, scale_val, slot, HAS_SCALE_TENSOR)
        tl.store(ws_rows + part * stride_ws_split, acc, mask=mask_r)
    if PHASE == 0:
        _tile_barrier(count_ptr + (piece * num_tiles + tile) * 2, num_parts)
    if PHASE != 1:
        # .cg: the partials were written by other programs of this launch (not via L1)
        buf = _sum_partials(ws_ptr, tokens, mask_m, piece, R, num_parts, stride_ws_split,
                            stride_ws_m, BLOCK_M, BLOCK_R, UNROLL, ".cg")
        N = _pick(piece, n0, n1, n2)
        b_ptr = _pick(piece, b0_ptr, b1_ptr, b2_ptr)
        col_offset = _pick(piece, off0, off1, off2)
        n_chunk = tl.cdiv(tl.cdiv(N, num_parts), BLOCK_N) * BLOCK_N
        n_lo = part * n_chunk
        for n in range(n_lo, tl.minimum(n_lo + n_chunk, N), BLOCK_N):
            _expand_tile(y_ptr, b_ptr, buf, tokens, mask_m, slot, n, N, R, col_offset,
                         stride_ym, BLOCK_N, BLOCK_R, DOT_UPCAST)
