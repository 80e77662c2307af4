"""`knots` — KnOTS (Stoica, Ramesh, Ecsedi, Choshen, Hoffman, "Model merging with SVD to tie
the KnOTS", ICLR 2025, arXiv:2410.19735). APPROXIMATE, except with merge="linear" (exact sum).

Space: the joint SVD of the task updates placed side by side,
    [ΔW_1 … ΔW_n] = U Σ [V_1ᵀ … V_nᵀ],      ΔW_i = s_i B_i A_i   [out, in]
so every task is U Σ V_iᵀ: one shared basis U Σ, and per task the rows Σ V_iᵀ [k, in]. Those
rows are merged by a rule from `aligned.py` (ties by default; the official code puts Σ on
V_i, "s_on_V", and merges the rows with TIES or DARE), giving ΔW = U · merge(Σ V_iᵀ).

Never d_out x d_in: with [s_1 B_1 … s_n B_n] = Q_b T_b (QR, [out, R]) and A_iᵀ = Q_i T_i per
task, the side-by-side matrix is Q_b · T_b blockdiag(T_iᵀ) · blockdiag(Q_iᵀ), so an SVD of
the (Σ r_i)² core K = T_b blockdiag(T_iᵀ) = u σ vᵀ gives U = Q_b u, Σ = σ and
V_iᵀ = vᵀ[:, block i] Q_iᵀ. Cost O((out + n·in)·R² + R³), memory O((out + n·in)·R).
Singular values below rounding noise are dropped (the official code drops σ ≤ 1e-5).

Output: lora_b = U Σ^½ and lora_a = Σ^-½ · merged rows (rank ≤ Σ r_i; both sides carry √σ,
which keeps the factors' magnitudes balanced for half-precision storage).
The composition weights enter the rule as they enter `ties` (after sign election); a module
with a single adapter passes through weighted (there is nothing to align or resolve).
Differences from the official code: the rule runs per module (the official TIES prunes over
one vector of all layers), and the weights are per adapter (the official scales all tasks by
one λ — the same as equal weights λ here).
"""

from __future__ import annotations

import torch

from merging.methods.aligned import merge_aligned, numerical_rank
from merging.methods.cat import merge_cat
from merging.methods.common import ModuleInputs, ModuleOutput


def joint_svd(inputs: ModuleInputs):
    """U [out, k], σ [k] and the rows Σ V_iᵀ [k, in] per adapter of [s_1 ΔW_1 … s_n ΔW_n]."""
    scaled_b = torch.cat([s * b for b, s in zip(inputs.lora_bs, inputs.scalings)], dim=1)  # [out, R]
    q_b, t_b = torch.linalg.qr(scaled_b)  # [out, p], [p, R]
    q_as, t_as = zip(*(torch.linalg.qr(a.T) for a in inputs.lora_as))  # [in, q_i], [q_i, r_i]
    core = t_b @ torch.block_diag(*(t.T for t in t_as))  # [p, Σ q_i]
    u, singular, vh = torch.linalg.svd(core, full_matrices=False)
    k = numerical_rank(singular, core.shape)
    u, singular, vh = u[:, :k], singular[:k], vh[:k]
    rows, start = [], 0
    for q_a in q_as:
        rows.append((singular[:, None] * vh[:, start : start + q_a.shape[1]]) @ q_a.T)  # [k, in]
        start += q_a.shape[1]
    return q_b @ u, singular, rows


def merge_knots(
    inputs: ModuleInputs,
    rank: int | None,
    *,
    merge: str,
    density: float,
    majority_sign_method: str,
    generator: torch.Generator,
    **_,
) -> ModuleOutput:
    if len(inputs.lora_as) == 1:
        return merge_cat(inputs, None)
    basis, singular, rows = joint_svd(inputs)
    if singular.numel() == 0:  # every input is zero
        return merge_cat(inputs, None)
    merged = merge_aligned(
        rows, inputs.weights, rule=merge, density=density,
        majority_sign_method=majority_sign_method, generator=generator,
    )
    root = singular.sqrt()
    return ModuleOutput(basis * root, merged / root[:, None])
