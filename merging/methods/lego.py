"""`lego` — LoRA-LEGO rank-wise clustering (Zhao et al., ICLR 2025). APPROXIMATE for k < Σ r_i.

Space: minimal semantic units (MSUs). Unit j of adapter i is column j of c_i·B_i with row j of
A_i (c_i = w_i s_i): a rank-1 update b aᵀ. All units of all adapters are pooled (concatenation
equals summation), clustered into k groups by k-means, and each group becomes one unit of the
rank-k result.

Per unit we keep unit-norm directions (b̂, â) and a magnitude m = |b|·|a|; a unit and its
negation (-b, -a) are the same update, so the sign is canonicalised (largest |â| entry positive).
A cluster's merged unit points along its centroid's directions (ĉ_b, ĉ_a); its magnitude is
the "parameter reweighting" choice:
- "l2" (default): σ = Σ ±m_j — the centroid is rescaled to the members' combined norm, undoing
  the norm decay of averaging directions (± = whether the member agrees with the centroid);
- "maxabs": the same with max-abs norms in place of L2 norms;
- "none": σ = Σ m_j (ĉ_b·b̂_j)(ĉ_a·â_j) — the least-squares fit of the cluster's summed update on
  the centroid directions (the plain centroid: decays as members spread).
"Output reweighting" multiplies every σ by √(r/k) (r = largest input rank) or leaves it ("none").
Clustering features: "direction" (default: [b̂; â]/√2, scale-free) or "raw" (√m-balanced
factors, so large units pull centroids harder).

The paper's exact formulas could not be read here; the choices above are parameters and their
defaults are provisional (see the README's merge-method section). Invariants: with k = Σ r_i
(every unit its own cluster) and no output reweighting the result is exactly `cat`; the unit
order of the inputs does not matter (units are sorted canonically before clustering); results
are deterministic for a seed.
"""

from __future__ import annotations

import math

import torch

from merging.factors import stack_factors
from merging.methods.common import ModuleInputs, ModuleOutput


def _units(inputs: ModuleInputs):
    """Pooled units as (b̂ [n, out], â [n, in], m [n], maxabs-magnitude [n]), zero units dropped,
    sign-canonical and sorted by magnitude (largest first) for input-order invariance."""
    lora_b, lora_a = stack_factors(inputs.lora_bs, inputs.lora_as, inputs.coefs)
    b, a = lora_b.T, lora_a  # [n, out], [n, in]
    norm_b, norm_a = b.norm(dim=1), a.norm(dim=1)
    keep = (norm_b > 0) & (norm_a > 0)
    b, a, norm_b, norm_a = b[keep], a[keep], norm_b[keep], norm_a[keep]
    b_hat, a_hat = b / norm_b[:, None], a / norm_a[:, None]
    pivot = a_hat.abs().argmax(dim=1)
    sign = a_hat.gather(1, pivot[:, None]).sign()
    b_hat, a_hat = b_hat * sign, a_hat * sign
    magnitude = norm_b * norm_a
    maxabs = b.abs().amax(dim=1) * a.abs().amax(dim=1)
    order = torch.argsort(magnitude, descending=True, stable=True)
    return b_hat[order], a_hat[order], magnitude[order], maxabs[order]


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, max_iter: int = 100) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations. points: [n, d]. Returns labels [n] in 0..k-1.

    The n points span at most n dimensions: clustering runs on their coordinates in that span
    (R of a QR of pointsᵀ), which keeps every distance, so the labels are those of the full
    space at a fraction of the cost when d >> n (d = out + in, n = Σ r_i).
    """
    n = points.shape[0]
    if points.shape[1] > n:
        points = torch.linalg.qr(points.T).R.T  # [n, n], same pairwise distances
    centers = points[torch.randint(n, (1,), generator=generator)]
    closest = torch.cdist(points, centers).squeeze(1).pow(2)
    for _ in range(1, k):
        probs = closest / closest.sum() if closest.sum() > 0 else torch.full_like(closest, 1 / n)
        pick = torch.multinomial(probs, 1, generator=generator)
        centers = torch.cat([centers, points[pick]])
        closest = torch.minimum(closest, torch.cdist(points, points[pick]).squeeze(1).pow(2))
    labels = torch.cdist(points, centers).argmin(dim=1)
    for _ in range(max_iter):
        onehot = torch.nn.functional.one_hot(labels, k).to(points.dtype)  # [n, k]
        counts = onehot.sum(dim=0)
        sums = onehot.T @ points
        filled = counts > 0
        centers[filled] = sums[filled] / counts[filled, None]
        for c in torch.nonzero(~filled).flatten().tolist():  # an empty cluster takes the farthest point
            far = torch.cdist(points, centers).min(dim=1).values.argmax()
            centers[c] = points[far]
        new_labels = torch.cdist(points, centers).argmin(dim=1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def _features(b_hat, a_hat, magnitude, features: str) -> torch.Tensor:
    if features == "raw":
        root = magnitude.sqrt()[:, None]
        return torch.cat([b_hat * root, a_hat * root], dim=1)
    return torch.cat([b_hat, a_hat], dim=1) / math.sqrt(2.0)


def _cluster_unit(b_hat, a_hat, magnitude, maxabs, reweight: str):
    """One merged unit (b [out], a [in]) for the members given (already selected)."""
    c_b, c_a = b_hat.mean(dim=0), a_hat.mean(dim=0)
    if c_b.norm() == 0 or c_a.norm() == 0:  # members cancel exactly
        return torch.zeros_like(c_b), torch.zeros_like(c_a)
    c_b, c_a = c_b / c_b.norm(), c_a / c_a.norm()
    agreement = (b_hat @ c_b) * (a_hat @ c_a)
    if reweight == "none":
        sigma = (magnitude * agreement).sum()
    elif reweight == "maxabs":
        sigma = (maxabs * agreement.sign()).sum()
        c_b, c_a = c_b / c_b.abs().max(), c_a / c_a.abs().max()
    else:
        sigma = (magnitude * agreement.sign()).sum()
    root = sigma.abs().sqrt()
    return c_b * root * sigma.sign(), c_a * root


def merge_lego(
    inputs: ModuleInputs,
    rank: int,
    *,
    features: str,
    param_reweight: str,
    output_reweight: str,
    generator: torch.Generator,
    max_iter: int,
    **_,
) -> ModuleOutput:
    b_hat, a_hat, magnitude, maxabs = _units(inputs)
    num_units = magnitude.shape[0]
    if num_units <= rank:
        labels = torch.arange(num_units)
    else:
        labels = kmeans(_features(b_hat, a_hat, magnitude, features), rank, generator, max_iter)
    out_features, in_features = inputs.lora_bs[0].shape[0], inputs.lora_as[0].shape[1]
    lora_b = torch.zeros(out_features, rank, dtype=b_hat.dtype)
    lora_a = torch.zeros(rank, in_features, dtype=a_hat.dtype)
    for c in range(min(rank, num_units)):
        members = labels == c
        if members.any():
            lora_b[:, c], lora_a[c] = _cluster_unit(
                b_hat[members], a_hat[members], magnitude[members], maxabs[members], param_reweight
            )
    if output_reweight == "sqrt":
        lora_b *= math.sqrt(max(inputs.ranks) / rank)
    return ModuleOutput(lora_b, lora_a)
