"""`ties`, `dare_linear`, `dare_ties`, `magnitude_prune` — task-vector merges on the dense ΔW,
then compressed to rank k. APPROXIMATE twice over: the pruning is the method itself, and the
rank-k compression of the pruned sum (which is no longer low-rank) loses what lies beyond k.

Space: dense ΔW_i = s_i B_i A_i per adapter (each scaling applied exactly once), weights w_i.
The definitions are peft's (`peft.utils.merge_utils`), applied to ΔW as peft's `*_svd`
variants do:
- magnitude_prune: keep the top `density` fraction of |ΔW_i|, then Σ w_i ΔW_i.
- ties: magnitude prune; elect a sign per entry from Σ pruned ΔW_i ("total") or the count of
  signs ("frequency"); average w_i ΔW_i over the adapters that agree with the elected sign.
- dare_linear: drop each entry with probability 1 - density and rescale survivors by 1/density
  (so E[result] = ΔW_i), then Σ w_i ΔW_i.
- dare_ties: DARE pruning, then TIES' sign election and disjoint mean.
Compression to rank k: exact SVD when min(out, in) <= 2048, randomized SVD above.
"""

from __future__ import annotations

import torch

from merging.factors import dense_truncated_svd
from merging.methods.common import ModuleInputs, ModuleOutput


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest entry of a 1-D tensor, exactly, without sorting or top-k of all of it.

    For large tensors a sample brackets the answer; only the entries inside the bracket
    (about 2% of them) go through kthvalue. Falls back to a full kthvalue if the bracket misses.
    """
    n = values.numel()
    target = n - k  # 0-based position in ascending order
    if n > 1 << 22:
        gen = torch.Generator().manual_seed(0)
        sample = values[torch.randint(n, (1 << 18,), generator=gen)].sort().values
        q, last = target / n, sample.numel() - 1
        lo = sample[max(int((q - 0.01) * last), 0)]
        hi = sample[min(int((q + 0.01) * last) + 1, last)]
        below = int((values < lo).sum())
        band = values[(values >= lo) & (values <= hi)]
        if below <= target < below + band.numel():
            return band.kthvalue(target - below + 1).values
    return values.kthvalue(target + 1).values


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """1 for the int(density · numel) largest |entries| (peft's magnitude pruning), 0 elsewhere."""
    keep = int(density * delta.numel())
    if keep == 0:
        return torch.zeros_like(delta)
    magnitudes = delta.abs()
    return (magnitudes >= kth_largest(magnitudes.reshape(-1), keep)).to(delta.dtype)


def dare_prune(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop entries with probability 1 - density, rescale the survivors by 1/density."""
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * mask / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """stacked: [n, out, in]. True where an entry's sign agrees with the elected sign."""
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Mean over the adapters whose entry agrees with the elected sign (zero if none does)."""
    total = (weighted * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp_min(1)


def _dense_deltas(inputs: ModuleInputs) -> list[torch.Tensor]:
    return [s * (b @ a) for a, b, s in zip(inputs.lora_as, inputs.lora_bs, inputs.scalings)]


def _weights(inputs: ModuleInputs, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(inputs.weights, dtype=like.dtype).reshape(-1, 1, 1)


def _ties_merge(pruned: list[torch.Tensor], inputs: ModuleInputs, sign_method: str) -> torch.Tensor:
    stacked = torch.stack(pruned)
    agree = majority_sign_mask(stacked, sign_method)
    return disjoint_mean(stacked * _weights(inputs, stacked), agree)


def _weighted_sum(pruned: list[torch.Tensor], inputs: ModuleInputs) -> torch.Tensor:
    return sum(w * d for w, d in zip(inputs.weights, pruned))


def _compress(delta: torch.Tensor, rank: int) -> ModuleOutput:
    lora_b, lora_a, singular = dense_truncated_svd(delta, rank)
    target_sq = float(delta.double().pow(2).sum())
    kept_sq = float(singular[: lora_a.shape[0]].double().pow(2).sum())
    return ModuleOutput(lora_b, lora_a, target_sq, max(target_sq - kept_sq, 0.0))


def merge_ties(inputs: ModuleInputs, rank: int, *, density: float, majority_sign_method: str, **_):
    pruned = [d * magnitude_mask(d, density) for d in _dense_deltas(inputs)]
    return _compress(_ties_merge(pruned, inputs, majority_sign_method), rank)


def merge_magnitude_prune(inputs: ModuleInputs, rank: int, *, density: float, **_):
    pruned = [d * magnitude_mask(d, density) for d in _dense_deltas(inputs)]
    return _compress(_weighted_sum(pruned, inputs), rank)


def merge_dare_linear(inputs: ModuleInputs, rank: int, *, density: float, generator: torch.Generator, **_):
    pruned = [dare_prune(d, density, generator) for d in _dense_deltas(inputs)]
    return _compress(_weighted_sum(pruned, inputs), rank)


def merge_dare_ties(
    inputs: ModuleInputs, rank: int, *, density: float, majority_sign_method: str, generator: torch.Generator, **_
):
    pruned = [dare_prune(d, density, generator) for d in _dense_deltas(inputs)]
    return _compress(_ties_merge(pruned, inputs, majority_sign_method), rank)
