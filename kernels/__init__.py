"""Batched multi-LoRA ops: Triton kernels on CUDA, a torch reference everywhere else.

Public API (shapes: T tokens, K hidden_in, N hidden_out, S slots, R rank):
    add_lora(y, x, lora_a, lora_b, slot_ids, scaling=1.0, *, meta=None) -> y
    add_lora_slices(y, x, lora_a_slices, lora_b_slices, slot_ids, scaling=1.0, *, meta=None) -> y
    lora_shrink(x, lora_a, slot_ids, scaling=1.0, *, meta=None) -> buf [T, R] float32
    lora_expand(y, buf, lora_b, slot_ids, *, meta=None, offset=0) -> y
    build_meta(slot_ids, num_slots) -> LoraBatchMeta   (once per batch, reused by every layer)
    add_lora_planned(y, x, lora_a, lora_b, meta) -> y   (engine hot path, Triton only: checks
        and launch plan once per meta and call signature, cached in meta.plans)
    add_lora_slices_planned(y, x, lora_a_slices, lora_b_slices, meta, scaling=1.0) -> y
        (the same for fused q/k/v and gate/up slices)
    StepMeta(max_num_tokens, num_slots, device)   (kernels.step: per-step metadata at fixed
        addresses, prefix metas per padded batch size, for CUDA-graph engines)

Backend: Triton when the tensors are on CUDA and triton imports, else the torch reference.
LORAMIX_KERNELS=triton|torch|auto (default auto) or the `backend=` argument overrides this;
`triton` on CPU tensors needs TRITON_INTERPRET=1 (how CI tests the kernels).
"""

from __future__ import annotations

import functools
import os

import torch

from kernels import reference
from kernels.meta import LoraBatchMeta, build_meta

__all__ = ["add_lora", "add_lora_planned", "add_lora_slices", "add_lora_slices_planned",
           "lora_shrink", "lora_expand",
           "build_meta", "LoraBatchMeta", "backend_for", "triton_available"]

BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(x: torch.Tensor, backend: str | None = None) -> str:
    """'triton' or 'torch' for tensors like x; `backend` or LORAMIX_KERNELS force a choice."""
    choice = backend or os.environ.get("LORAMIX_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' requested but triton is not installed")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    return "triton" if x.is_cuda and triton_available() else "torch"


def _impl(x: torch.Tensor, backend: str | None):
    if backend_for(x, backend) == "torch":
        return reference
    from kernels import triton_ops
    return triton_ops


def add_lora(y, x, lora_a, lora_b, slot_ids, scaling=1.0, *, meta=None, backend=None):
    """y[t] += scaling[s] * (x[t] @ lora_a[s].T) @ lora_b[s].T, s = slot_ids[t] (-1: untouched)."""
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R], slot_ids: [T]
    return _impl(x, backend).add_lora(y, x, lora_a, lora_b, slot_ids, scaling, meta=meta)


def add_lora_planned(y, x, lora_a, lora_b, meta: LoraBatchMeta, *, fused=None):
    """add_lora(y, x, lora_a, lora_b, meta.slot_ids, meta=meta) on the Triton backend, with the
    checks and launch configs done once per meta and call signature (triton_ops)."""
    # y: [T, N], x: [T, K], lora_a: [S, R, K] contiguous, lora_b: [S, N, R] contiguous
    return _triton_ops().add_lora_planned(y, x, lora_a, lora_b, meta, fused=fused)


def add_lora_slices_planned(y, x, lora_a_slices, lora_b_slices, meta: LoraBatchMeta,
                            scaling=1.0, *, fused=None):
    """add_lora_slices(..., meta.slot_ids, scaling, meta=meta) on the Triton backend, planned
    once per meta and call signature like add_lora_planned."""
    # y: [T, sum N_i], x: [T, K], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    return _triton_ops().add_lora_slices_planned(y, x, lora_a_slices, lora_b_slices, meta,
                                                 scaling, fused=fused)


@functools.cache
def _triton_ops():
    from kernels import triton_ops
    return triton_ops


def add_lora_slices(y, x, lora_a_slices, lora_b_slices, slot_ids, scaling=1.0, *, meta=None,
                    backend=None):
    """add_lora for fused q/k/v or gate/up: slice i adds into its column block of y."""
    # y: [T, sum N_i], lora_a_slices[i]: [S, R, K], lora_b_slices[i]: [S, N_i, R]
    return _impl(x, backend).add_lora_slices(y, x, lora_a_slices, lora_b_slices, slot_ids,
                                             scaling, meta=meta)


def lora_shrink(x, lora_a, slot_ids, scaling=1.0, *, meta=None, backend=None):
    """buf[t] = scaling[s] * x[t] @ lora_a[s].T in float32 (0 where slot is -1)."""
    # x: [T, K], lora_a: [S, R, K] -> buf: [T, R] float32
    return _impl(x, backend).lora_shrink(x, lora_a, slot_ids, scaling, meta=meta)


def lora_expand(y, buf, lora_b, slot_ids, *, meta=None, offset=0, backend=None):
    """y[t, offset:offset+N] += buf[t] @ lora_b[s].T (in place; rows with slot -1 untouched)."""
    # y: [T, width], buf: [T, R] float32, lora_b: [S, N, R]
    return _impl(y, backend).lora_expand(y, buf, lora_b, slot_ids, meta=meta, offset=offset)
