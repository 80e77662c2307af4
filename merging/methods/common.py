"""What every merge method receives for one module, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModuleInputs:
    """The adapters that touch one module. Adapter i contributes coefs[i] · lora_bs[i] @ lora_as[i],
    with coefs[i] = weights[i] · scalings[i] (composition weight times the adapter's own scaling)."""

    name: str
    lora_as: list[torch.Tensor]  # each [r_i, in]
    lora_bs: list[torch.Tensor]  # each [out, r_i]
    weights: list[float]
    scalings: list[float]

    @property
    def coefs(self) -> list[float]:
        return [w * s for w, s in zip(self.weights, self.scalings)]

    @property
    def ranks(self) -> list[int]:
        return [a.shape[0] for a in self.lora_as]


@dataclass
class ModuleOutput:
    """Merged factors (scaling 1): ΔW = lora_b @ lora_a.

    target_sq / residual_sq: for methods that compress a dense ΔW of their own (ties, dare...),
    ||ΔW_method||² and ||ΔW_method - lora_b @ lora_a||², so the compression error is reported.
    """

    lora_b: torch.Tensor  # [out, k]
    lora_a: torch.Tensor  # [k, in]
    target_sq: float | None = None
    residual_sq: float | None = None
