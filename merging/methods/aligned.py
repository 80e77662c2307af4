"""Merge rules applied in a space the tasks share: the inner step of `knots` and `core`.

Task i brings one tensor X_i, expressed in a basis common to all tasks (KnOTS: its rows
Σ V_iᵀ of the joint SVD; Core Space: its core matrix). X_i is built from s_i ΔW_i, without
the composition weight, as `ties` builds its dense ΔW_i. The rules are `delta.py`'s (peft's
definitions), applied to the X_i in place of dense ΔW_i, with weights w_i applied the same way:
- linear: Σ w_i X_i (task arithmetic; at the default weights 1/N, the plain average);
- magnitude_prune: keep the top `density` fraction of |X_i| per task, then Σ w_i X_i;
- ties: magnitude prune; elect a sign per entry; average w_i X_i over the tasks that agree;
- dare_linear / dare_ties: DARE (drop with probability 1 - density, rescale by 1/density),
  then Σ w_i X_i or TIES' sign election and disjoint mean.
"""

from __future__ import annotations

from typing import Sequence

import torch

from merging.methods.delta import dare_prune, disjoint_mean, magnitude_mask, majority_sign_mask

RULES = ("ties", "dare_ties", "dare_linear", "magnitude_prune", "linear")


def merge_aligned(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    rule: str,
    density: float,
    majority_sign_method: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One tensor from the per-task `tensors` (all the same shape) by `rule`."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [t * magnitude_mask(t, density) for t in tensors]
    elif rule in ("dare_ties", "dare_linear"):
        tensors = [dare_prune(t, density, generator) for t in tensors]
    stacked = torch.stack(list(tensors))  # [n, ...]
    scale = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *[1] * (stacked.dim() - 1))
    if rule in ("ties", "dare_ties"):
        return disjoint_mean(stacked * scale, majority_sign_mask(stacked, majority_sign_method))
    return (stacked * scale).sum(dim=0)


def numerical_rank(singular: torch.Tensor, shape: Sequence[int]) -> int:
    """How many of the (descending) singular values are above the rounding noise of a matrix
    of `shape`: σ > σ_max · max(shape) · eps (numpy's matrix_rank tolerance)."""
    if singular.numel() == 0 or singular[0] <= 0:
        return 0
    tolerance = singular[0] * max(shape) * torch.finfo(singular.dtype).eps
    return int((singular > tolerance).sum())
