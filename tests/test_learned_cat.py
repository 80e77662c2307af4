"""Learned CAT (lab.learned_cat, `loramix tune-cat`): per-module softmax weights, the model
left as it was, the merged `cat` adapter computing exactly what was trained, training that
lowers the loss on the skill lab, and the named composition served by a running server."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from lab.learned_cat import _encode, _unwrap, _wrap, tune_cat
from merging import IncompatibleAdaptersError, InvalidMergeOptions, load_adapter, merge
from server_process import ServerProcess

EXAMPLES = [(f"The sum of {a} and {b} is", f" {a + b}") for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def tiny(tiny_base, skills_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    adapters = [load_adapter(skills_dir / name) for name in ("math", "code")]
    return model, tokenizer, adapters


def test_weights_are_a_softmax_per_module_and_deterministic(tiny):
    model, tokenizer, adapters = tiny
    first = tune_cat(model, tokenizer, adapters, EXAMPLES, steps=4, batch_size=4, seed=3)
    again = tune_cat(model, tokenizer, adapters, EXAMPLES, steps=4, batch_size=4, seed=3)
    other = tune_cat(model, tokenizer, adapters, EXAMPLES, steps=4, batch_size=4, seed=4)
    assert set(first.module_weights) == {m for a in adapters for m in a.modules}
    for row in first.module_weights.values():
        assert len(row) == 2 and all(w > 0 for w in row) and abs(sum(row) - 1) < 1e-5
    assert first.module_weights == again.module_weights
    assert first.module_weights != other.module_weights
    assert any(abs(row[0] - 0.5) > 1e-3 for row in first.module_weights.values())  # it did learn


def test_chat_examples_are_encoded_as_a_chat_turn(tiny):
    """With chat, the prompt is the chat template's user turn (as the server renders a chat
    request) and the loss covers the completion and the end-of-turn token."""
    _, tokenizer, _ = tiny
    (ids, prompt_len), = _encode(tokenizer, [("What is 2 + 3?", "5")], chat=True)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert ids[:prompt_len] == tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[prompt_len:] == tokenizer("5", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    (raw, raw_len), = _encode(tokenizer, [("What is 2 + 3?", "5")])
    assert raw_len < prompt_len and raw[raw_len:] == ids[prompt_len:]


def test_the_model_is_left_as_it_was(tiny):
    model, tokenizer, adapters = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    tune_cat(model, tokenizer, adapters, EXAMPLES, steps=2, batch_size=4)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    assert all(type(model.get_submodule(m)) is torch.nn.Linear for m in adapters[0].modules)
    assert not model.training


def test_the_merged_cat_adapter_computes_what_was_trained(tiny, tmp_path):
    """merge(cat, module_weights) through peft = the training-time wrapped forward."""
    model, tokenizer, adapters = tiny
    result = tune_cat(model, tokenizer, adapters, EXAMPLES, steps=6, batch_size=4, lr=0.3)
    ids = tokenizer(["The sum of 4 and 5 is 9"], return_tensors="pt").input_ids
    wrapped = _wrap(model, adapters, torch.zeros(2))
    try:
        with torch.no_grad():
            for module, layer in wrapped.items():
                layer.logits.copy_(torch.tensor(result.module_weights[module]).log())
            trained = model(input_ids=ids).logits
    finally:
        _unwrap(model, wrapped)
    merged = merge(adapters, result.info["mean_weights"], method="cat", module_weights=result.module_weights)
    merged.adapter.save(tmp_path / "tuned")
    peft_model = PeftModel.from_pretrained(model, tmp_path / "tuned").eval()
    try:
        with torch.no_grad():
            served = peft_model(input_ids=ids).logits
    finally:
        peft_model.unload()
    assert torch.allclose(trained, served, atol=1e-5, rtol=1e-4)


def test_learning_lowers_the_heldout_loss_on_the_skill_lab():
    from lab.compose import ASSETS, load_base
    from lab.data import mixed_examples

    model, tokenizer = load_base()
    adapters = [load_adapter(ASSETS / "skills" / name) for name in ("sort", "add")]
    result = tune_cat(model, tokenizer, adapters, mixed_examples(["sort", "add"], 64), steps=20, batch_size=16)
    info = result.info
    assert info["heldout_loss_after"] < info["heldout_loss_before"]
    assert info["train_examples"] + info["heldout_examples"] == 128


def test_bad_inputs_raise(tiny, tmp_path):
    model, tokenizer, adapters = tiny
    with pytest.raises(InvalidMergeOptions, match="at least two adapters"):
        tune_cat(model, tokenizer, adapters[:1], EXAMPLES)
    with pytest.raises(InvalidMergeOptions, match="initial weights"):
        tune_cat(model, tokenizer, adapters, EXAMPLES, init_weights=[1.0, -1.0])
    from lab.compose import ASSETS

    lab_adapters = [load_adapter(ASSETS / "skills" / name) for name in ("sort", "add")]
    with pytest.raises(IncompatibleAdaptersError, match="do not fit this base model"):
        tune_cat(model, tokenizer, lab_adapters, EXAMPLES, steps=1)


def _tune_cat_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "tune-cat", *args],
                          capture_output=True, text=True, timeout=600)


def test_tune_cat_saves_a_named_composition_a_running_server_serves(tiny_base, skills_dir, tmp_path):
    data = tmp_path / "mix.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in EXAMPLES))
    common = ["--base-model", str(tiny_base), "--skills-dir", str(skills_dir), "--cache-dir", str(tmp_path / "cache")]
    server = ServerProcess(tmp_path / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                           served_model_name="tiny", cache_dir=tmp_path / "cache")
    try:
        done = _tune_cat_cli("math", "code", "--data", str(data), "--name", "mc-tuned", "--steps", "5",
                             "--batch-size", "4", "--lr", "0.3", "--quiet", *common)
        assert done.returncode == 0, done.stderr
        assert "saved 'mc-tuned'" in done.stdout and "held-out loss" in done.stdout

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        greedy = {"prompt": "The sum of", "temperature": 0, "max_tokens": 8}
        served = client.completions.create(model="mc-tuned", **greedy)
        assert served.model == "mc-tuned"
        # The same composition sent in full through the `composition` field gives the same text.
        stored = json.loads((tmp_path / "cache" / "named_compositions.json").read_text())["mc-tuned"]["spec"]
        composition = {"skills": [{"name": n, "weight": w} for n, w in stored["skills"]],
                       "method": "cat", "module_weights": stored["module_weights"]}
        direct = client.completions.create(model="tiny", extra_body={"composition": composition}, **greedy)
        assert direct.choices[0].text == served.choices[0].text
        plain = client.completions.create(model="math+code", **greedy)
        assert "module_weights=" in direct.model and plain.model == "math+code"

        described = httpx.get(server.url + "/v1/compositions/mc-tuned").json()
        assert described["module_weights"]["modules"] == len(stored["module_weights"])
    finally:
        server.stop()

    # Errors are one line, exit code 2, and save nothing.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    for args, needle in [
        (["math", "code", "--data", str(bad), "--name", "x"], "line 1"),
        (["math", "nope", "--data", str(data), "--name", "x"], "unknown skill"),
        (["math", "code", "--data", str(data), "--name", "math"], "already the name"),
        (["math", "code", "--data", str(data), "--name", "../x"], "composition name"),
    ]:
        done = _tune_cat_cli(*args, "--steps", "1", *common)
        assert done.returncode == 2 and needle in done.stderr, done.stderr
    names = json.loads((tmp_path / "cache" / "named_compositions.json").read_text())
    assert list(names) == ["mc-tuned"]
