"""PEFT format: round trips, scaling folded once, validation that collects every problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_factories import MODULE_SHAPES, merged_delta, random_adapter, rel
from merging import (
    AdapterError,
    IncompatibleAdaptersError,
    LoraAdapter,
    LoraModule,
    adapter_digest,
    load_adapter,
    merge,
)


def test_round_trip_keeps_delta_and_folds_scaling(tmp_path):
    adapter = random_adapter(1, rank=4, scaling=0.75)
    adapter.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 and not config["use_rslora"]
    loaded = load_adapter(tmp_path / "a")
    for module in MODULE_SHAPES:
        assert loaded.modules[module].scaling == 1.0
        assert rel(merged_delta(loaded, module), merged_delta(adapter, module)) < 1e-6


def test_mixed_ranks_are_zero_padded_to_one_rank(tmp_path):
    small = random_adapter(1, rank=2, modules=["layers.0.q"])
    big = random_adapter(2, rank=6, modules=["layers.0.v"])
    merged = merge([small, big], [1.0, 1.0], "cat").adapter
    merged.save(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {6}
    loaded = load_adapter(tmp_path / "m")
    assert rel(merged_delta(loaded, "layers.0.q"), merged_delta(small, "layers.0.q")) < 1e-6


def test_dtype_is_kept_on_save(tmp_path):
    adapter = random_adapter(1, dtype=torch.bfloat16)
    merge([adapter, adapter], None, "cat").adapter.save(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def _write(path, config: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"]}
    (path / "adapter_config.json").write_text(json.dumps({**base, **config}))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def _pair(out=4, inp=3, r=2):
    return {
        "base_model.model.layers.0.q.lora_A.weight": torch.randn(r, inp),
        "base_model.model.layers.0.q.lora_B.weight": torch.randn(out, r),
    }


def test_validation_collects_every_problem_in_one_error(tmp_path):
    tensors = _pair()
    tensors["base_model.model.layers.1.q.lora_A.weight"] = torch.randn(2, 3)  # no lora_B
    tensors["base_model.model.embed.lora_embedding_A"] = torch.randn(2, 3)
    _write(tmp_path / "bad", {"use_dora": True, "modules_to_save": ["lm_head"], "bias": "all"}, tensors)
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path / "bad", name="bad")
    message = str(info.value)
    for fragment in ("DoRA", "modules_to_save", "bias", "no lora_B", "embedding"):
        assert fragment in message
    assert str(tmp_path) not in message and info.value.param == "bad"


@pytest.mark.parametrize(
    "config, tensors, fragment",
    [
        ({"r": 3}, _pair(), "declares 3"),
        ({}, {**_pair(), "base_model.model.layers.0.q.lora_B.weight": torch.full((4, 2), float("nan"))}, "NaN"),
        ({"peft_type": "IA3"}, _pair(), "not LORA"),
        ({}, {"base_model.model.layers.0.q.lora_A.weight": torch.randn(2, 3),
              "base_model.model.layers.0.q.lora_B.weight": torch.randn(4, 5)}, "are not [r, in]"),
    ],
)
def test_each_invalid_adapter_is_rejected(tmp_path, config, tensors, fragment):
    _write(tmp_path / "x", config, tensors)
    with pytest.raises(AdapterError, match=fragment.replace("[", r"\[")):
        load_adapter(tmp_path / "x")


def test_missing_or_unreadable_files_are_clear_errors(tmp_path):
    with pytest.raises(AdapterError, match="needs adapter_config.json"):
        load_adapter(tmp_path / "nothing", name="ghost")
    _write(tmp_path / "broken", {}, _pair())
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterError) as info:
        load_adapter(tmp_path / "broken")
    assert str(tmp_path) not in str(info.value)


def test_incompatible_shapes_and_base_models_are_reported_together():
    a = random_adapter(1)
    b = LoraAdapter({"layers.0.q": LoraModule(torch.randn(2, 99), torch.randn(24, 2))}, base_model="other-model")
    with pytest.raises(IncompatibleAdaptersError) as info:
        merge([a, b], None, "cat", names=["math", "code"])
    assert "different base models" in str(info.value) and "'layers.0.q'" in str(info.value)
    merge([a, random_adapter(2)], None, "cat")  # same base, same shapes: fine


def test_digest_is_content_addressed(tmp_path):
    adapter = random_adapter(1)
    adapter.save(tmp_path / "a")
    adapter.save(tmp_path / "b")
    assert adapter_digest(tmp_path / "a") == adapter_digest(tmp_path / "b")
    random_adapter(2).save(tmp_path / "b")
    assert adapter_digest(tmp_path / "a") != adapter_digest(tmp_path / "b")


def test_loading_an_adapter_again_and_again_keeps_no_memory(tmp_path):
    """A server loads adapters all day (engine slots, merges): loading must keep nothing.
    safetensors 0.8's mmap backend kept two objects per tensor per load (~56 B traced, ~260 B
    native): 32 tensors x 400 loads would leave ~700 KiB traced here."""
    import gc
    import tracemalloc

    modules = {f"layers.{i}.q": (8, 8) for i in range(16)}
    adapter = LoraAdapter({name: LoraModule(torch.randn(2, 8), torch.randn(8, 2), 1.0) for name in modules})
    adapter.save(tmp_path / "a")
    for _ in range(20):  # first-use caches (dtype tables, imports) are not a leak
        load_adapter(tmp_path / "a")
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(400):
            load_adapter(tmp_path / "a")
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert grown - before < 64 * 1024, f"{(grown - before) / 1024:.0f} KiB kept after 400 loads"
