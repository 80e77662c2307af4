"""Torch reference of the multi-LoRA ops: same signatures as the public API, any device.

Numerics (shared with the Triton kernels): the shrink accumulates in float32 and applies the
slot's scaling there; the expand adds the float32 product to y in float32 and rounds once to
y's dtype. Rows whose slot is -1 are never touched. One matmul per active slot: this is also
the CPU path of the local engine.
"""

from __future__ import annotations

import torch

from kernels import checks
from kernels.meta import LoraBatchMeta


def _slot_rows(slot_ids: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """[(slot, token indices)] for every slot that has tokens."""
    ids = slot_ids.long()
    return [(int(s), torch.nonzero(ids == s).flatten()) for s in torch.unique(ids[ids >= 0])]


def _scale(scaling: float | torch.Tensor, slot: int) -> float:
    return float(scaling[slot]) if isinstance(scaling, torch.Tensor) else float(scaling)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor,
                scaling: float | torch.Tensor = 1.0, *,
                meta: LoraBatchMeta | None = None) -> torch.Tensor:
    """buf[t] = scaling[s] * x[t] @ lora_a[s].T for s = slot_ids[t]; 0 where s = -1."""
    # x: [num_tokens, hidden_in], lora_a: [num_slots, rank, hidden_in] -> [num_tokens, rank] fp32
    checks.check_matrix("x", x)
    num_slots, rank = checks.check_lora_a(lora_a, x)
    checks.check_slot_ids(slot_ids, x.shape[0], x.device)
    checks.check_scaling(scaling, num_slots, x.device)
    checks.check_meta(meta, x.shape[0], num_slots, x.device)
    buf = torch.zeros(x.shape[0], rank, dtype=torch.float32, device=x.device)
    for slot, rows in _slot_rows(slot_ids):
        _check_slot(slot, num_slots)
        buf[rows] = (x[rows].float() @ lora_a[slot].float().T) * _scale(scaling, slot)
    return buf


def lora_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor,
                slot_ids: torch.Tensor, *, meta: LoraBatchMeta | None = None,
                offset: int = 0) -> torch.Tensor:
    """y[t, offset:offset+N] += buf[t] @ lora_b[s].T for s = slot_ids[t] != -1 (in place)."""
    # y: [num_tokens, width], buf: [num_tokens, rank] fp32, lora_b: [num_slots, N, rank]
    checks.check_matrix("y", y)
    num_slots = lora_b.shape[0] if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 else 0
    rank = lora_b.shape[2] if num_slots else 0
    hidden_out = checks.check_lora_b(lora_b, num_slots, rank, y)
    checks.check_buf(buf, y.shape[0], rank)
    checks.check_slot_ids(slot_ids, y.shape[0], y.device)
    checks.check_out_range(y, offset, hidden_out)
    checks.check_meta(meta, y.shape[0], num_slots, y.device)
    cols = slice(offset, offset + hidden_out)
    for slot, rows in _slot_rows(slot_ids):
        _check_slot(slot, num_slots)
        delta = buf[rows] @ lora_b[slot].float().T
        y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
    return y


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_ids: torch.Tensor, scaling: float | torch.Tensor = 1.0, *,
             meta: LoraBatchMeta | None = None) -> torch.Tensor:
    """y += scaling[s] * x @ lora_a[s].T @ lora_b[s].T per token (in place); returns y."""
    # y: [num_tokens, N], x: [num_tokens, K], lora_a: [S, R, K], lora_b: [S, N, R]
    checks.check_matrix("y", y, rows=x.shape[0] if isinstance(x, torch.Tensor) else None)
    buf = lora_shrink(x, lora_a, slot_ids, scaling, meta=meta)
    if isinstance(lora_b, torch.Tensor) and lora_b.dim() == 3 and lora_b.shape[1] != y.shape[1]:
        raise ValueError(f"lora_b hidden_out {lora_b.shape[1]} != y width {y.shape[1]}")
    return lora_expand(y, buf, lora_b, slot_ids, meta=meta)


def add_lora_slices(y: torch.Tensor, x: torch.Tensor, lora_a_slices, lora_b_slices,
                    slot_ids: torch.Tensor, scaling: float | torch.Tensor = 1.0, *,
                    meta: LoraBatchMeta | None = None) -> torch.Tensor:
    """add_lora for fused projections: slice i writes y[:, sum(N_<i) : sum(N_<=i)]."""
    # y: [num_tokens, sum N_i], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    widths = checks_slices(y, lora_a_slices, lora_b_slices)
    offset = 0
    for lora_a, lora_b, width in zip(lora_a_slices, lora_b_slices, widths):
        buf = lora_shrink(x, lora_a, slot_ids, scaling, meta=meta)
        lora_expand(y, buf, lora_b, slot_ids, meta=meta, offset=offset)
        offset += width
    return y


def checks_slices(y: torch.Tensor, lora_a_slices, lora_b_slices) -> list[int]:
    """Validate slice lists against y; returns the widths N_i."""
    checks.check_matrix("y", y)
    if not isinstance(lora_a_slices, (list, tuple)) or not isinstance(lora_b_slices, (list, tuple)):
        raise TypeError("lora_a_slices and lora_b_slices must be lists of tensors")
    if len(lora_a_slices) != len(lora_b_slices) or not lora_a_slices:
        raise ValueError(f"need the same non-zero number of A and B slices, got "
                         f"{len(lora_a_slices)} and {len(lora_b_slices)}")
    widths = []
    for i, lora_b in enumerate(lora_b_slices):
        if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3:
            raise ValueError(f"lora_b_slices[{i}] must be [num_slots, N_i, rank]")
        widths.append(lora_b.shape[1])
    if sum(widths) != y.shape[1]:
        raise ValueError(f"slice widths {widths} sum to {sum(widths)}, y width is {y.shape[1]}")
    return widths


def _check_slot(slot: int, num_slots: int) -> None:
    if slot >= num_slots:
        raise ValueError(f"slot id {slot} out of range for {num_slots} slots")
