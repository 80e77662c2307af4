"""One peft LoRA slot per adapted projection of a base model, refilled with each row's adapter:
the quality benchmarks score many adapters without reloading the model."""

from __future__ import annotations

import torch

from merging import LoraAdapter


class AdapterSlots:
    """The base model wrapped once by peft, with one LoRA (scaling 1) per adapted projection.

    `load(adapter)` puts an adapter's factors in place of the LoRA weights, sized to the
    adapter's rank: scaling folded into lora_b, rounded to the adapter's dtype (as the server
    saves a merge), modules of lower rank zero-padded, absent modules zero. None loads zeros
    (the base). The slots take the device and dtype of the layer they adapt. Nothing is
    reloaded, so a row costs its merge and its scoring only.
    """

    def __init__(self, base_model, targets: list[str]):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets)
        self.model = get_peft_model(base_model, config).eval()
        self.layers = {name.removeprefix("base_model.model."): layer
                       for name, layer in self.model.named_modules() if hasattr(layer, "lora_A")}

    def load(self, adapter: LoraAdapter | None) -> None:
        modules = adapter.modules if adapter else {}
        unknown = sorted(set(modules) - set(self.layers))
        if unknown:
            raise ValueError(f"the base model has no LoRA slot for {unknown[:3]}")
        rank = max(1, adapter.max_rank if adapter else 0)
        for name, layer in self.layers.items():
            base = layer.get_base_layer()
            lora_a = torch.zeros(rank, base.in_features)
            lora_b = torch.zeros(base.out_features, rank)
            if name in modules:
                m = modules[name]
                lora_a[:m.rank] = m.lora_a.to(adapter.dtype).float()
                lora_b[:, :m.rank] = (m.lora_b.float() * m.scaling).to(adapter.dtype).float()
            place = {"device": base.weight.device, "dtype": base.weight.dtype}
            layer.lora_A["default"] = _linear(lora_a.to(**place))
            layer.lora_B["default"] = _linear(lora_b.to(**place))

    def release(self):
        """The base model, unwrapped."""
        return self.model.unload()


def _linear(weight: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    return layer
