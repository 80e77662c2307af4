"""`cat` — concatenation (LoRA Soups' CAT with fixed weights). Exact.

Space: factors. ΔW = Σ w_i s_i B_i A_i, written as [w_1 s_1 B_1 ... w_n s_n B_n] @ [A_1; ...; A_n].
Rank Σ r_i; input ranks may differ. No approximation of any kind.
"""

from __future__ import annotations

from merging.factors import stack_factors
from merging.methods.common import ModuleInputs, ModuleOutput


def merge_cat(inputs: ModuleInputs, rank: int | None, **_) -> ModuleOutput:
    lora_b, lora_a = stack_factors(inputs.lora_bs, inputs.lora_as, inputs.coefs)
    return ModuleOutput(lora_b, lora_a)
