"""`svd` — the exact weighted sum truncated to rank k (Eckart–Young optimal). Approximate when
k < Σ r_i, exact otherwise.

Space: factors. The sum is stacked as in `cat`; QR of the stacked B and Aᵀ and an SVD of the
small (Σ r_i)² core give the top-k singular triplets of ΔW without ever building the
d_out x d_in matrix (peft's `svd` builds it and runs a full SVD per module). Each adapter's
scaling is applied exactly once.
"""

from __future__ import annotations

from merging.factors import stack_factors, truncated_svd
from merging.methods.common import ModuleInputs, ModuleOutput


def merge_svd(inputs: ModuleInputs, rank: int, **_) -> ModuleOutput:
    lora_b, lora_a = stack_factors(inputs.lora_bs, inputs.lora_as, inputs.coefs)
    if lora_a.shape[0] <= rank:
        return ModuleOutput(lora_b, lora_a)
    new_b, new_a, _ = truncated_svd(lora_b, lora_a, rank)
    return ModuleOutput(new_b, new_a)
