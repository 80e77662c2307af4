"""The demo builders: deterministic, idempotent, and adapters that really change the model."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.demo import DEMO_SKILLS, build_skill_adapter, build_tiny_base, ensure_demo


def _digest(directory):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_demo_layout(demo_paths):
    names = sorted(p.name for p in demo_paths.skills_dir.iterdir())
    assert names == sorted(name for name, *_ in DEMO_SKILLS)
    config = json.loads((demo_paths.base_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    assert config["tie_word_embeddings"] is False
    poetry = json.loads((demo_paths.skills_dir / "poetry" / "adapter_config.json").read_text())
    assert poetry["r"] == 4
    assert poetry["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_base_build_is_deterministic(tmp_path, tiny_base):
    again = build_tiny_base(tmp_path / "base")
    assert _digest(again) == _digest(tiny_base)


def test_adapter_build_is_deterministic_and_nonzero(tmp_path, tiny_base, skills_dir):
    again = build_skill_adapter(
        tiny_base, tmp_path / "math", rank=8, alpha=16, seed=1, base_model_name="loramix-tiny-base"
    )
    assert _digest(again) == _digest(skills_dir / "math")
    first = load_file(skills_dir / "math" / "adapter_model.safetensors")
    second = load_file(again / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key])
        assert first[key].abs().max() > 0, key


def test_ensure_demo_is_idempotent_and_repairs(tmp_path, demo_paths):
    root = tmp_path / "demo"
    paths = ensure_demo(root)
    stamp = (paths.skills_dir / "math" / "adapter_model.safetensors").stat().st_mtime_ns
    assert ensure_demo(root) == paths
    assert (paths.skills_dir / "math" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # An interrupted build (marker missing, a skill gone) is rebuilt completely.
    (root / ".loramix-demo-complete").unlink()
    for f in (paths.skills_dir / "code").iterdir():
        f.unlink()
    ensure_demo(root)
    assert _digest(paths.skills_dir / "code") == _digest(demo_paths.skills_dir / "code")


def test_tokenizer_round_trip_and_chat_template(tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    text = "café 東京 😀 def f(x): return x*2"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert ids == "<|bos|><|user|>hi<|eos|><|assistant|>"
    assert tok.eos_token_id is not None and tok.pad_token_id is not None


def test_each_skill_changes_greedy_output(tiny_base, skills_dir):
    from peft import PeftModel

    prompt = torch.tensor([[1, 4, 60, 396, 277, 302, 16, 24, 36, 2, 5]])
    outputs = {}
    for name in [None] + [n for n, *_ in DEMO_SKILLS]:
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        if name is not None:
            model = PeftModel.from_pretrained(model, skills_dir / name)
        out = model.generate(prompt, max_new_tokens=8, do_sample=False)
        outputs[name] = tuple(out[0, prompt.shape[1]:].tolist())
    assert len(set(outputs.values())) == len(outputs), outputs


def test_concurrent_ensure_demo_builds_once(tmp_path, demo_paths):
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path / "shared"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(ensure_demo, [root, root]))
    assert results[0] == results[1]
    for name, *_ in DEMO_SKILLS:
        assert _digest(root / "skills" / name) == _digest(demo_paths.skills_dir / name)
