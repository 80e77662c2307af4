"""Linear algebra on LoRA factors, without building d_out x d_in matrices.

A sum of LoRA updates Σ c_i B_i A_i is the single product [c_1 B_1 ... c_n B_n] @ [A_1; ...; A_n]
("concatenation equals summation"). Norms and truncated SVDs of such a product need only the
small R x R Gram and core matrices, R = Σ r_i.
"""

from __future__ import annotations

import torch


def stack_factors(lora_bs: list[torch.Tensor], lora_as: list[torch.Tensor], coefs: list[float]):
    """[c_1 B_1 ... c_n B_n] [out, R] and [A_1; ...; A_n] [R, in] for ΔW = Σ c_i B_i A_i."""
    lora_b = torch.empty(lora_bs[0].shape[0], sum(b.shape[1] for b in lora_bs), dtype=lora_bs[0].dtype)
    start = 0
    for b, coef in zip(lora_bs, coefs):
        torch.mul(b, coef, out=lora_b[:, start : start + b.shape[1]])
        start += b.shape[1]
    return lora_b, torch.cat(lora_as, dim=0)


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±inf. One read pass: a finite sum implies finite entries;
    only when the sum overflows are the entries checked one by one."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def frobenius_sq(lora_b: torch.Tensor, lora_a: torch.Tensor) -> float:
    """||lora_b @ lora_a||_F^2 = sum((BᵀB) ∘ (AAᵀ)), in float64 for a stable difference."""
    lora_b, lora_a = lora_b.double(), lora_a.double()
    return float(((lora_b.T @ lora_b) * (lora_a @ lora_a.T)).sum().clamp_min(0.0))


def difference_sq(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """||b1 @ a1 - b2 @ a2||_F^2 computed from the stacked factors [b1, -b2] [a1; a2]."""
    return frobenius_sq(torch.cat([b1, -b2.to(b1.dtype)], dim=1), torch.cat([a1, a2.to(a1.dtype)], dim=0))


def truncated_svd(lora_b: torch.Tensor, lora_a: torch.Tensor, rank: int):
    """Best rank-`rank` approximation (Eckart–Young) of lora_b @ lora_a, in factored form.

    lora_b: [out, R], lora_a: [R, in]. QR of both factors reduces the product to a small core
    Rb Raᵀ whose SVD gives the singular values of ΔW. Returns (new_b [out, k], new_a [k, in],
    singular_values [min(R, out, in)]) with the singular values split evenly (√σ on each side).
    """
    q_b, r_b = torch.linalg.qr(lora_b)  # [out, R'], [R', R]
    q_a, r_a = torch.linalg.qr(lora_a.T)  # [in, R''], [R'', R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # core [R', R'']
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root
    new_a = (root[:, None] * vh[:k]) @ q_a.T
    return new_b, new_a, s


def dense_truncated_svd(delta: torch.Tensor, rank: int, *, exact_below: int = 2048):
    """Rank-`rank` factors of a dense ΔW [out, in]: exact SVD for small matrices, randomized
    (torch.svd_lowrank, oversampled, 4 power iterations) above `exact_below`."""
    if min(delta.shape) <= exact_below:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    else:
        q = min(rank + 32, min(delta.shape))
        u, s, v = torch.svd_lowrank(delta, q=q, niter=4)
        vh = v.T
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return u[:, :k] * root, root[:, None] * vh[:k], s
