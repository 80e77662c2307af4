"""`linear` — peft-compatible factor averaging. APPROXIMATE: not the weighted sum of ΔW.

Space: factors, separately. A = Σ sign(c_i)·√|c_i|·A_i and B = Σ √|c_i|·B_i with c_i = w_i s_i,
as peft's `add_weighted_adapter(combination_type="linear")`. Then B @ A contains cross terms
√|c_i c_j| B_i A_j (i ≠ j) that no input adapter has; it equals the weighted sum only for a
single adapter. Ranks that differ are zero-padded to the largest (peft requires equal ranks).
Offered for parity with peft-made merges; prefer `cat`, `svd` or `lego`.
"""

from __future__ import annotations

import math

import torch

from merging.methods.common import ModuleInputs, ModuleOutput


def merge_linear(inputs: ModuleInputs, rank: int | None, **_) -> ModuleOutput:
    max_rank = max(inputs.ranks)
    lora_a = torch.zeros(max_rank, inputs.lora_as[0].shape[1], dtype=inputs.lora_as[0].dtype)
    lora_b = torch.zeros(inputs.lora_bs[0].shape[0], max_rank, dtype=inputs.lora_bs[0].dtype)
    for a, b, coef in zip(inputs.lora_as, inputs.lora_bs, inputs.coefs):
        root = math.sqrt(abs(coef))
        lora_a[: a.shape[0]] += math.copysign(root, coef) * a
        lora_b[:, : b.shape[1]] += root * b
    return ModuleOutput(lora_b, lora_a)
