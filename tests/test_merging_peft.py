"""Equivalence with peft where the definitions agree, and merged adapters loaded by peft."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from lora_factories import MODULE_SHAPES, TinyNet, merged_delta, rel
from merging import load_adapter, merge

TARGETS = ["q", "v", "down"]


def _randomize(model, adapter: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            for factor in (module.lora_A[adapter].weight, module.lora_B[adapter].weight):
                factor.data = torch.randn(factor.shape, generator=gen) * 0.5


def _peft_pair(tmp_path: Path, config_b: LoraConfig, config_a: LoraConfig | None = None):
    """A peft model with adapters 'a' and 'b' (random, non-zero B), both saved as PEFT dirs."""
    config_a = config_a or LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    model = get_peft_model(TinyNet(), config_a, adapter_name="one")
    model.add_adapter("two", config_b)
    _randomize(model, "one", 1)
    _randomize(model, "two", 2)
    dirs = {}
    for name in ("one", "two"):
        model.save_pretrained(tmp_path / name, selected_adapters=[name])
        dirs[name] = next((tmp_path / name).rglob("adapter_config.json")).parent
    return model, dirs


def _peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name.removeprefix("base_model.model."): module.get_delta_weight(adapter).double()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter in module.lora_A
    }


CONFIGS_B = {
    "plain": LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS),
    "rslora": LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=TARGETS),
    "patterns": LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, rank_pattern={"down": 4}, alpha_pattern={"v": 3}
    ),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS_B))
def test_loaded_scaling_matches_peft(tmp_path, kind):
    model, dirs = _peft_pair(tmp_path, CONFIGS_B[kind])
    ours = load_adapter(dirs["two"])
    for module, delta in _peft_deltas(model, "two").items():
        assert rel(merged_delta(ours, module), delta) < 1e-6


@pytest.mark.parametrize("kind", sorted(CONFIGS_B))
@pytest.mark.parametrize("method", ["cat", "linear"])
def test_cat_and_linear_match_add_weighted_adapter(tmp_path, kind, method):
    model, dirs = _peft_pair(tmp_path, CONFIGS_B[kind])
    weights = [0.7, -0.45]
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type=method)
    ours = merge([load_adapter(dirs["one"]), load_adapter(dirs["two"])], weights, method)
    for module, delta in _peft_deltas(model, "m").items():
        assert rel(merged_delta(ours.adapter, module), delta) < 1e-5


def test_svd_matches_peft_svd_and_the_eckart_young_optimum(tmp_path):
    model, dirs = _peft_pair(tmp_path, LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS))
    weights, rank = [0.6, 0.4], 3
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type="svd", svd_rank=rank)
    ours = merge([load_adapter(dirs["one"]), load_adapter(dirs["two"])], weights, "svd", rank=rank)
    exact = {m: weights[0] * d for m, d in _peft_deltas(model, "one").items()}
    for m, d in _peft_deltas(model, "two").items():
        exact[m] = exact[m] + weights[1] * d
    for module, peft_delta in _peft_deltas(model, "m").items():
        u, s, vh = torch.linalg.svd(exact[module])
        optimum = (u[:, :rank] * s[:rank]) @ vh[:rank]
        assert rel(merged_delta(ours.adapter, module), optimum) < 1e-4
        assert rel(merged_delta(ours.adapter, module), peft_delta) < 1e-4


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("sign_method", ["total", "frequency"])
def test_pruning_methods_match_peft_merge_utils_on_delta_w(tmp_path, method, sign_method):
    model, dirs = _peft_pair(tmp_path, CONFIGS_B["plain"])
    weights, density = [0.8, 0.5], 0.4
    options = {"density": density}
    if method == "ties":
        options["majority_sign_method"] = sign_method
    ours = merge([load_adapter(dirs["one"]), load_adapter(dirs["two"])], weights, method, rank=40, options=options)
    deltas_a, deltas_b = _peft_deltas(model, "one"), _peft_deltas(model, "two")
    for module in deltas_a:
        tensors = [deltas_a[module].float(), deltas_b[module].float()]
        w = torch.tensor(weights)
        if method == "ties":
            ref = merge_utils.ties(tensors, w, density, sign_method)
        else:
            ref = merge_utils.magnitude_prune(tensors, w, density)
        assert rel(merged_delta(ours.adapter, module), ref.double()) < 1e-4


def test_ties_svd_matches_peft_at_equal_rank(tmp_path):
    model, dirs = _peft_pair(tmp_path, CONFIGS_B["rslora"])
    weights = [1.0, 0.6]
    model.add_weighted_adapter(["one", "two"], weights, "m", combination_type="ties_svd", svd_rank=12, density=0.5)
    ours = merge([load_adapter(dirs["one"]), load_adapter(dirs["two"])], weights, "ties", rank=12)
    for module, delta in _peft_deltas(model, "m").items():
        assert rel(merged_delta(ours.adapter, module), delta) < 1e-4


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["cat", "lego", "svd", "ties"])
def test_merged_directory_loads_in_peft_with_the_same_logits_as_delta_w_by_hand(tmp_path, method):
    base = _tiny_llama()
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
        LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    ]
    dirs = []
    for i, config in enumerate(configs):
        model = get_peft_model(copy.deepcopy(base), config)
        _randomize(model, "default", 10 + i)
        model.save_pretrained(tmp_path / f"skill{i}")
        dirs.append(tmp_path / f"skill{i}")
    result = merge([load_adapter(d) for d in dirs], [0.6, 0.4], method, rank=None if method == "cat" else 8)
    result.adapter.save(tmp_path / "merged")

    by_hand = copy.deepcopy(base)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for module, lora in result.adapter.modules.items():
            params[f"{module}.weight"] += lora.delta()
    served = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "merged").eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got, plain = by_hand(tokens).logits, served(tokens).logits, base(tokens).logits
    assert rel(got.double(), expected.double()) < 1e-5
    assert rel(plain.double(), expected.double()) > 1e-3  # the adapter really changes the output
