"""Shape, dtype and device checks shared by the torch reference and the Triton wrappers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_matrix(name: str, t: torch.Tensor, rows: int | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        _fail(f"{name} must be a 2-D tensor, got {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if rows is not None and t.shape[0] != rows:
        _fail(f"{name} has {t.shape[0]} rows, expected {rows} (num_tokens)")


def check_slot_ids(slot_ids: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if not isinstance(slot_ids, torch.Tensor) or slot_ids.dim() != 1:
        _fail(f"slot_ids must be a 1-D tensor, got {_shape(slot_ids)}")
    if slot_ids.dtype.is_floating_point or slot_ids.dtype == torch.bool:
        raise TypeError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")
    if slot_ids.numel() != num_tokens:
        _fail(f"slot_ids has {slot_ids.numel()} entries, expected {num_tokens} (num_tokens)")
    if slot_ids.device != device:
        _fail(f"slot_ids is on {slot_ids.device}, x is on {device}")


def check_lora_a(lora_a: torch.Tensor, x: torch.Tensor) -> tuple[int, int]:
    """lora_a: [num_slots, rank, hidden_in] matching x: [num_tokens, hidden_in]."""
    if not isinstance(lora_a, torch.Tensor) or lora_a.dim() != 3:
        _fail(f"lora_a must be [num_slots, rank, hidden_in], got {_shape(lora_a)}")
    if lora_a.shape[2] != x.shape[1]:
        _fail(f"lora_a hidden_in {lora_a.shape[2]} != x hidden_in {x.shape[1]}")
    _same(lora_a, x, "lora_a", "x")
    return lora_a.shape[0], lora_a.shape[1]


def check_lora_b(lora_b: torch.Tensor, num_slots: int, rank: int, ref: torch.Tensor) -> int:
    """lora_b: [num_slots, hidden_out, rank]; returns hidden_out."""
    if not isinstance(lora_b, torch.Tensor) or lora_b.dim() != 3:
        _fail(f"lora_b must be [num_slots, hidden_out, rank], got {_shape(lora_b)}")
    if lora_b.shape[0] != num_slots or lora_b.shape[2] != rank:
        _fail(f"lora_b {tuple(lora_b.shape)} does not match num_slots={num_slots}, rank={rank}")
    if lora_b.device != ref.device:
        _fail(f"lora_b is on {lora_b.device}, expected {ref.device}")
    if lora_b.dtype not in FLOAT_DTYPES:
        raise TypeError(f"lora_b must be float16, bfloat16 or float32, got {lora_b.dtype}")
    return lora_b.shape[1]


def check_scaling(scaling: float | torch.Tensor, num_slots: int, device: torch.device) -> None:
    if isinstance(scaling, torch.Tensor):
        if scaling.shape != (num_slots,):
            _fail(f"scaling tensor must be [num_slots={num_slots}], got {tuple(scaling.shape)}")
        if not scaling.dtype.is_floating_point:
            raise TypeError(f"scaling must be a float tensor, got {scaling.dtype}")
        if scaling.device != device:
            _fail(f"scaling is on {scaling.device}, expected {device}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling must be a float or a [num_slots] tensor, got {type(scaling)}")


def check_buf(buf: torch.Tensor, num_tokens: int, rank: int) -> None:
    if not isinstance(buf, torch.Tensor) or buf.shape != (num_tokens, rank):
        _fail(f"buf must be [num_tokens={num_tokens}, rank={rank}], got {_shape(buf)}")
    if buf.dtype != torch.float32:
        raise TypeError(f"buf must be float32, got {buf.dtype}")


def check_out_range(y: torch.Tensor, offset: int, width: int) -> None:
    if offset < 0 or offset + width > y.shape[1]:
        _fail(f"output columns [{offset}, {offset + width}) exceed y width {y.shape[1]}")


def check_meta(meta, num_tokens: int, num_slots: int, device: torch.device) -> None:
    if meta is None:
        return
    if (meta.num_tokens, meta.num_slots) != (num_tokens, num_slots):
        _fail(f"meta was built for {meta.num_tokens} tokens / {meta.num_slots} slots, "
              f"call has {num_tokens} / {num_slots}")
    if meta.device != device:
        _fail(f"meta is on {meta.device}, tensors are on {device}")


def _same(t: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} dtype {t.dtype} != {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        _fail(f"{name} is on {t.device}, {ref_name} is on {ref.device}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
