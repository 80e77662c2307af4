"""`core` — Core Space merging (Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov,
Calderara, van de Weijer, "Accurate and Efficient Low-Rank Model Merging in Core Space",
NeurIPS 2025, arXiv:2509.17786). APPROXIMATE, except with merge="linear" (exact sum).

Space: reference bases shared by all tasks, from the stacked factors: U_B, the left singular
vectors of [s_1 B_1 … s_n B_n] [out, R], and V_A, the right singular vectors of
[A_1; …; A_n] [R, in]. Every task lies inside them losslessly, ΔW_i = U_B M_i V_Aᵀ with the
small core M_i = U_Bᵀ s_i B_i A_i V_A [R, R]. The cores are merged by a rule from `aligned.py`
(ties by default; the paper pairs the space with TIES, DARE, TSV and others), giving
ΔW = U_B · merge(M_i) · V_Aᵀ.

Never d_out x d_in: with the stacks = Q_b T_b and Q_a T_a (QR) and T_b = u_b σ_b ·, T_a = u_a σ_a ·
(SVD of [R, R] matrices), U_B = Q_b u_b, V_A = Q_a u_a and M_i = u_bᵀ T_b[:, block i] ·
(u_aᵀ T_a[:, block i])ᵀ, all from R x R matrices. Cost O((out + in)·R² + R³).
Basis directions with singular values below rounding noise are dropped.

Output: the merged core's own SVD M = p σ qᵀ gives lora_b = U_B p σ^½ and
lora_a = σ^½ qᵀ V_Aᵀ, its zero directions dropped (rank ≤ Σ r_i).
The composition weights enter the rule as they enter `ties`; a module with a single adapter
passes through weighted. The rule runs per module, as in the official code.
"""

from __future__ import annotations

import torch

from merging.methods.aligned import merge_aligned, numerical_rank
from merging.methods.cat import merge_cat
from merging.methods.common import ModuleInputs, ModuleOutput


def _reference_basis(stacked: torch.Tensor):
    """Q [d, p] and u [p, k] with Q u the leading singular vectors of `stacked` [d, R] that are
    above rounding noise, and T [p, R] with stacked = Q T."""
    q, t = torch.linalg.qr(stacked)
    u, singular, _ = torch.linalg.svd(t, full_matrices=False)
    return q, u[:, : numerical_rank(singular, stacked.shape)], t


def core_space(inputs: ModuleInputs):
    """U_B [out, kb], V_A [in, ka] and each adapter's core M_i [kb, ka] (scaling folded in)."""
    scaled_b = torch.cat([s * b for b, s in zip(inputs.lora_bs, inputs.scalings)], dim=1)  # [out, R]
    q_b, u_b, t_b = _reference_basis(scaled_b)
    q_a, u_a, t_a = _reference_basis(torch.cat(inputs.lora_as, dim=0).T)  # stacked Aᵀ [in, R]
    cores, start = [], 0
    for rank in inputs.ranks:
        block = slice(start, start + rank)
        cores.append((u_b.T @ t_b[:, block]) @ (u_a.T @ t_a[:, block]).T)
        start += rank
    return q_b @ u_b, q_a @ u_a, cores


def merge_core(
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
    left, right, cores = core_space(inputs)
    merged = merge_aligned(
        cores, inputs.weights, rule=merge, density=density,
        majority_sign_method=majority_sign_method, generator=generator,
    )
    p, singular, qh = torch.linalg.svd(merged, full_matrices=False)
    k = numerical_rank(singular, merged.shape)
    if k == 0:  # every input is zero, or the rule kept nothing
        return ModuleOutput(left.new_zeros(left.shape[0], 1), right.new_zeros(1, right.shape[0]))
    root = singular[:k].sqrt()
    return ModuleOutput((left @ p[:, :k]) * root, (root[:, None] * qh[:k]) @ right.T)
