"""Random LoRA adapters and tiny peft models for the merging tests (no hub, non-zero lora_B)."""

from __future__ import annotations

import torch
from torch import nn

from merging import LoraAdapter, LoraModule

MODULE_SHAPES = {  # module path -> (out, in)
    "layers.0.q": (24, 16),
    "layers.0.v": (12, 16),
    "layers.1.q": (24, 16),
    "layers.1.down": (16, 40),
}


def random_adapter(seed: int, rank: int = 4, scaling: float = 0.5, modules=None, dtype=torch.float32) -> LoraAdapter:
    """An adapter with Gaussian factors on `modules` (default: all of MODULE_SHAPES)."""
    gen = torch.Generator().manual_seed(seed)
    picked = modules or list(MODULE_SHAPES)
    return LoraAdapter(
        {
            name: LoraModule(
                torch.randn(rank, MODULE_SHAPES[name][1], generator=gen).to(dtype),
                torch.randn(MODULE_SHAPES[name][0], rank, generator=gen).to(dtype),
                scaling,
            )
            for name in picked
        },
        base_model="tiny-base",
        dtype=dtype,
    )


def weighted_delta(adapters, weights, module: str) -> torch.Tensor:
    """Σ w_i ΔW_i for one module, dense, float64: the exact target of every method."""
    out, inp = MODULE_SHAPES[module]
    total = torch.zeros(out, inp, dtype=torch.float64)
    for adapter, weight in zip(adapters, weights):
        if module in adapter.modules:
            total += weight * adapter.modules[module].delta(torch.float64)
    return total


def merged_delta(adapter: LoraAdapter, module: str) -> torch.Tensor:
    return adapter.modules[module].delta(torch.float64)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.detach() - ref.detach()).norm() / ref.detach().norm())


class TinyNet(nn.Module):
    """A model with plain Linear layers that peft can adapt (paths mirror MODULE_SHAPES)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.ModuleDict(), nn.ModuleDict()])
        self.layers[0]["q"] = nn.Linear(16, 24, bias=False)
        self.layers[0]["v"] = nn.Linear(16, 12, bias=False)
        self.layers[1]["q"] = nn.Linear(16, 24, bias=False)
        self.layers[1]["down"] = nn.Linear(40, 16, bias=False)

    def forward(self, x):
        return self.layers[0]["q"](x)
