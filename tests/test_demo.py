"""The demo worlds: the tiny random builders (deterministic, idempotent, adapters that really
change the model) and the shipped skill-lab world."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from lab.demo import (
    DEMO_SKILLS,
    LAB_ASSETS,
    LAB_SKILLS,
    build_skill_adapter,
    build_tiny_base,
    describe_demo,
    ensure_demo,
)


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


def test_base_build_in_bfloat16_rounds_the_same_draw(tmp_path, tiny_base):
    """bench/vllm_gpu's 8B shape saves bf16 weights (16 GB, not 32): the same draw, rounded."""
    half = build_tiny_base(tmp_path / "half", dtype="bfloat16")
    assert json.loads((half / "config.json").read_text())["vocab_size"] == \
        json.loads((tiny_base / "config.json").read_text())["vocab_size"]
    full, rounded = (load_file(next(d.glob("*.safetensors"))) for d in (tiny_base, half))
    assert full.keys() == rounded.keys()
    for key in full:
        assert rounded[key].dtype == torch.bfloat16, key
        assert torch.equal(rounded[key], full[key].to(torch.bfloat16)), key


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
    paths = ensure_demo(root, world="tiny")
    stamp = (paths.skills_dir / "math" / "adapter_model.safetensors").stat().st_mtime_ns
    assert ensure_demo(root, world="tiny") == paths
    assert (paths.skills_dir / "math" / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    # An interrupted build (marker missing, a skill gone) is rebuilt completely.
    (root / ".loramix-demo-complete").unlink()
    for f in (paths.skills_dir / "code").iterdir():
        f.unlink()
    ensure_demo(root, world="tiny")
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
        results = list(pool.map(lambda r: ensure_demo(r, world="tiny"), [root, root]))
    assert results[0] == results[1]
    for name, *_ in DEMO_SKILLS:
        assert _digest(root / "skills" / name) == _digest(demo_paths.skills_dir / name)


def test_lab_world_installs_the_shipped_assets(tmp_path):
    paths = ensure_demo(tmp_path / "lab", world="lab")
    assert sorted(p.name for p in paths.skills_dir.iterdir()) == sorted(LAB_SKILLS)
    assert _digest(paths.base_dir) == _digest(LAB_ASSETS / "base")
    for skill in LAB_SKILLS:
        assert _digest(paths.skills_dir / skill) == _digest(LAB_ASSETS / "skills" / skill)
        config = json.loads((paths.skills_dir / skill / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "loramix-skill-lab"
    config = json.loads((paths.base_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == 64
    model = AutoModelForCausalLM.from_pretrained(paths.base_dir)
    assert next(model.parameters()).dtype == torch.float32
    assert json.loads(describe_demo(paths))["skills"] == {"add": 16, "reverse": 8, "sort": 8, "upper": 8}


def test_switching_world_reinstalls(tmp_path):
    root = tmp_path / "demo"
    ensure_demo(root, world="lab")
    tiny = ensure_demo(root, world="tiny")
    assert sorted(p.name for p in tiny.skills_dir.iterdir()) == sorted(name for name, *_ in DEMO_SKILLS)
    lab = ensure_demo(root, world="lab")
    assert sorted(p.name for p in lab.skills_dir.iterdir()) == sorted(LAB_SKILLS)
    assert _digest(lab.base_dir) == _digest(LAB_ASSETS / "base")


def test_lab_tokenizer_speaks_the_task_format(tmp_path):
    paths = ensure_demo(tmp_path / "lab", world="lab")
    tok = AutoTokenizer.from_pretrained(paths.base_dir)
    ids = tok.encode("reverse: abc =>")
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("reverse: abc =>")
    assert tok.decode(ids, skip_special_tokens=True) == "reverse: abc =>"
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "upper: abc =>"}],
        add_generation_prompt=True, tokenize=False,
    )
    assert chat == "<|bos|>upper: abc =>"


def test_unknown_world_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown demo world"):
        ensure_demo(tmp_path / "x", world="nosuch")


def test_smollm2_world_serves_the_converted_model_and_its_shipped_skills(tmp_path, monkeypatch, tiny_base):
    """The default world: the base comes from lab.real.base (stubbed here: the real conversion
    takes minutes), served under the model's name, with the skills of lab/real/assets."""
    import lab.demo as demo
    from lab.real import base as real_base

    calls = []
    monkeypatch.setattr(real_base, "ensure_base_model", lambda root=None: calls.append(root) or tiny_base)
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(demo, "REAL_SKILLS", shipped)
    paths = ensure_demo(tmp_path / "demo", models_root=tmp_path / "models")
    assert demo.DEFAULT_WORLD == "smollm2" and calls == [tmp_path / "models"]
    assert (paths.base_dir, paths.served_name) == (tiny_base, "SmolLM2-135M-Instruct")
    assert list(paths.skills_dir.iterdir()) == []
    build_skill_adapter(tiny_base, shipped / "words", rank=4, alpha=8)
    (shipped / "words" / "train_report.json").write_text("{}")
    paths = ensure_demo(tmp_path / "demo", models_root=tmp_path / "models")  # new skills: reinstalled
    assert sorted(p.name for p in (paths.skills_dir / "words").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    lab = ensure_demo(tmp_path / "demo", world="lab")
    assert lab.served_name == "loramix-demo" and lab.base_dir == tmp_path / "demo" / "base"


def test_serve_settings_offer_every_world():
    import typing

    from lab.demo import WORLDS
    from server.settings import Settings

    assert typing.get_args(Settings.model_fields["demo"].annotation) == WORLDS
    assert Settings().demo == "smollm2"
