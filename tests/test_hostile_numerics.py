"""Hostile numbers: requests whose sampling values, seeds, weights or ranks are extreme.

Each gets either a correct answer or a 400 naming the offending field, never a 500 or an empty
200; and a sequence whose output turns non-finite fails alone, leaving its batch neighbours'
tokens unchanged. Unit tests for the two layers underneath: sampling safety and merge bounds."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from lora_factories import random_adapter

import merging
from lab.demo import build_skill_adapter
from server.app import create_app
from server.engines.base import AdapterHandle, NonFiniteOutputError, SamplingOptions
from server.engines.local import LocalEngine, LocalSettings
from server.engines.local.sampling import TokenSampler
from server.settings import Settings

BASE = "tiny"
MAX_LORA_RANK = 32  # above math+code's total rank 16, so both rank bounds can be hit
PROMPT = "The sum of"


@pytest.fixture(scope="module")
def hostile_skills(tiny_base, skills_dir, tmp_path_factory) -> Path:
    """The demo skills plus `huge`: finite lora_B entries so large (~1e36) that applying it
    overflows the activations (NaN logits), and at weight 100 its scaled factors overflow."""
    skills = tmp_path_factory.mktemp("hostile") / "skills"
    shutil.copytree(skills_dir, skills)
    build_skill_adapter(tiny_base, skills / "huge", rank=4, seed=21, init_std=1e36,
                        base_model_name="loramix-tiny-base")
    return skills


@pytest.fixture(scope="module")
def client(tiny_base, hostile_skills, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hostile-cache")
    settings = Settings(base_model=tiny_base, skills_dir=hostile_skills, cache_dir=cache,
                        served_model_name=BASE)
    engine = LocalEngine(tiny_base, LocalSettings(max_lora_rank=MAX_LORA_RANK))
    app = create_app(settings, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.engine = engine
        yield test_client


def _complete(client, **body):
    return client.post("/v1/completions", json={"model": "math", "prompt": PROMPT, "max_tokens": 6,
                                                 "temperature": 0, **body})


def _error(response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "/" not in error["message"]  # no server paths
    return error


# ---------------------------------------------------------------- through the app

_LEGO_SEED = {"skills": {"math": 0.5, "code": 0.5}, "method": "lego", "options": {"seed": 2**70}}


@pytest.mark.parametrize(
    "body, code, param, needle",
    [
        ({"seed": 2**64}, "invalid_request_error", "seed", "9223372036854775807"),
        ({"seed": 2**63}, "invalid_request_error", "seed", "9223372036854775807"),
        ({"seed": -(2**63) - 1}, "invalid_request_error", "seed", "-9223372036854775808"),
        ({"model": f"math+code@lego(seed={2**70})"}, "invalid_composition", "model", "seed"),
        ({"model": BASE, "composition": _LEGO_SEED}, "invalid_composition", "composition.options.seed", "seed"),
        ({"model": "math*1e300+code*1e300@svd"}, "invalid_composition", "model", "at most 100"),
        ({"model": "math*1e30"}, "invalid_composition", "model", "at most 100"),
        ({"model": "math*-101"}, "invalid_composition", "model", "at most 100"),
        ({"model": BASE, "composition": {"skills": {"code": 0.5, "math": 1e30}}},
         "invalid_composition", "composition.skills.1.weight", "at most 100"),
        ({"model": BASE, "composition": {"skills": {"math": 1.0}, "module_weights": {
            "model.layers.0.self_attn.q_proj": [1e30]}}},
         "invalid_composition", "composition.module_weights", "100"),
        ({"model": "math+code@lego(rank=100000)"}, "rank_limit_exceeded", "model", "100000"),
        ({"model": "math+code@svd(rank=33)"}, "rank_limit_exceeded", "model", "32"),
        ({"model": "math+code@lego(rank=17)"}, "invalid_composition", "model", "total rank 16"),
        ({"model": BASE, "composition": {"skills": {"math": 0.5, "code": 0.5}, "method": "svd", "rank": 17}},
         "invalid_composition", "composition.rank", "total rank 16"),
        ({"model": "math*1e-50"}, "merge_failed", None, "all-zero"),
        ({"model": "huge*100+math*0.5@svd(rank=4)"}, "merge_failed", None, "svd"),
        ({"model": "huge"}, "non_finite_output", "model", "not finite"),
    ],
)
def test_hostile_request_is_a_400_naming_the_field(client, body, code, param, needle):
    response = _complete(client, **body)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert (error["code"], error["param"]) == (code, param)
    assert error["type"] == "invalid_request_error"
    assert needle in error["message"]


@pytest.mark.parametrize("sampling", [{"temperature": 1e-45}, {"temperature": 1e-6, "seed": 3},
                                      {"temperature": 1.0, "top_p": 1e-300},
                                      {"temperature": 2.0, "top_p": 5e-324, "seed": 2**63 - 1, "n": 2}])
def test_degenerate_sampling_values_are_greedy(client, sampling):
    greedy = _complete(client, model="math+code")
    assert greedy.status_code == 200, greedy.text
    answer = _complete(client, model="math+code", **sampling)
    assert answer.status_code == 200, answer.text
    texts = [choice["text"] for choice in answer.json()["choices"]]
    assert texts == [greedy.json()["choices"][0]["text"]] * len(texts)


def test_extreme_in_range_seeds_are_accepted(client):
    for seed in (2**63 - 1, -(2**63)):
        response = _complete(client, seed=seed, temperature=1.0, n=2)
        assert response.status_code == 200, response.text
        again = _complete(client, seed=seed, temperature=1.0, n=2)
        assert [c["text"] for c in again.json()["choices"]] == [c["text"] for c in response.json()["choices"]]


def test_poisoned_stream_ends_with_an_error_event(client):
    with client.stream("POST", "/v1/completions", json={
            "model": "huge", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "non_finite_output"


def _stream_text(client, body, started: threading.Event | None = None) -> str:
    """Text of a streamed completion; sets `started` once the first token has arrived."""
    text = ""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            payload = line[len("data: "):] if line.startswith("data: ") else None
            if payload is None or payload == "[DONE]":
                continue
            chunk = json.loads(payload)
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            if started is not None:
                started.set()
    return text


def test_bystander_in_a_poisoned_batch_keeps_its_tokens(client):
    """A long greedy stream keeps decoding, token for token as alone, while a poisoned request
    (NaN logits) joins its batch and fails with its own error."""
    long = {"model": "math", "prompt": PROMPT, "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    alone = _stream_text(client, long)
    short_alone = _complete(client, model="code", max_tokens=8, ignore_eos=True).json()["choices"][0]["text"]
    _complete(client, model="huge")  # merged and cached: the poisoned request below only decodes

    started, results = threading.Event(), {}
    bystander = threading.Thread(target=lambda: results.update(stream=_stream_text(client, long, started)))
    bystander.start()
    assert started.wait(30)
    poisoned = _complete(client, model="huge")
    neighbour = _complete(client, model="code", max_tokens=8, ignore_eos=True)  # after the failure
    bystander.join(60)

    assert poisoned.status_code == 400 and _error(poisoned)["code"] == "non_finite_output"
    assert results["stream"] == alone
    assert neighbour.status_code == 200 and neighbour.json()["choices"][0]["text"] == short_alone
    assert client.engine.health()["max_adapters_per_pass"] >= 2  # math and huge shared passes


# ---------------------------------------------------------------- the engine's batch


def _run(engine: LocalEngine, scenario):
    async def main():
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def _tokens(engine, request_id, prompt, sampling, adapter):
    """(token ids, error) of one request."""
    tokens = []
    try:
        async for delta in engine.generate(request_id, prompt, sampling, adapter):
            tokens += delta.token_ids
    except Exception as exc:  # noqa: BLE001 - the error is the result under test
        return tokens, exc
    return tokens, None


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_poisoned_sequence_fails_alone_in_its_batch(tiny_base, hostile_skills, kv_cache):
    """In one forward pass: a greedy bystander, a sampled bystander and a poisoned row. Then a
    shorter request takes the poisoned row's place (static: its stale buffer columns)."""
    handles = {name: AdapterHandle(i + 1, name, hostile_skills / name, rank)
               for i, (name, rank) in enumerate([("math", 8), ("code", 8), ("huge", 4)])}
    greedy = SamplingOptions(max_tokens=40, temperature=0.0, ignore_eos=True)
    sampled = SamplingOptions(max_tokens=40, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True)
    long_prompt, short_prompt = list(range(3, 40)), [5, 6, 7]

    async def scenario(engine):
        for handle in handles.values():
            await engine.add_adapter(handle)
        alone = [await _tokens(engine, "a1", long_prompt, greedy, handles["math"]),
                 await _tokens(engine, "a2", long_prompt, sampled, handles["code"]),
                 await _tokens(engine, "a3", short_prompt, greedy, handles["code"])]
        batch = [asyncio.create_task(_tokens(engine, "b1", long_prompt, greedy, handles["math"])),
                 asyncio.create_task(_tokens(engine, "b2", long_prompt, sampled, handles["code"])),
                 asyncio.create_task(_tokens(engine, "p", long_prompt, greedy, handles["huge"]))]
        poisoned = await batch[2]
        late = await _tokens(engine, "b3", short_prompt, greedy, handles["code"])  # b1, b2 still run
        return alone, await asyncio.gather(*batch[:2]), poisoned, late, engine.health()

    engine = LocalEngine(tiny_base, LocalSettings(max_lora_rank=16, kv_cache=kv_cache, max_model_len=128, device="cpu"))
    alone, together, (poisoned_tokens, error), late, health = _run(engine, scenario)
    assert health["max_adapters_per_pass"] == 3  # the three shared a forward pass
    assert poisoned_tokens == [] and isinstance(error, NonFiniteOutputError)
    assert together == alone[:2]
    assert late == alone[2]


# ---------------------------------------------------------------- sampling safety


LOGITS = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 10


@pytest.mark.parametrize("options", [
    {"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 9.9e-6, "seed": 1},
    {"temperature": 1.0, "top_p": 1e-300, "seed": 1}, {"temperature": 2.0, "top_p": 5e-324, "seed": 2},
])
def test_tiny_temperature_or_top_p_picks_the_top_token(options):
    sampler = TokenSampler(SamplingOptions(**options))
    assert {sampler.sample(LOGITS) for _ in range(20)} == {int(LOGITS.argmax())}


def test_small_but_sampled_temperature_stays_finite_on_huge_logits():
    logits = LOGITS * 1e36  # finite float32; logits / 1e-5 would overflow float32
    sampler = TokenSampler(SamplingOptions(temperature=1e-5, seed=0))
    assert not sampler.is_greedy
    assert sampler.sample(logits) == int(logits.argmax())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("options", [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.5, "seed": 1}])
def test_non_finite_logits_raise_the_sequence_error(bad, options):
    logits = LOGITS.clone()
    logits[7] = bad
    with pytest.raises(NonFiniteOutputError):
        TokenSampler(SamplingOptions(**options)).sample(logits)


def test_seeds_beyond_int64_from_n_choices_wrap_instead_of_failing():
    top = TokenSampler(SamplingOptions(temperature=1.0, seed=2**63 - 1 + 1))  # choice j=1 of the max seed
    assert 0 <= top.sample(LOGITS) < 64
    wrapped = TokenSampler(SamplingOptions(temperature=1.0, seed=2**64 + 5))
    plain = TokenSampler(SamplingOptions(temperature=1.0, seed=5))
    assert [wrapped.sample(LOGITS) for _ in range(5)] == [plain.sample(LOGITS) for _ in range(5)]


# ---------------------------------------------------------------- merge bounds


@pytest.mark.parametrize("seed, ok", [(2**32 - 1, True), (2**32, False), (2**70, False), (-1, False)])
@pytest.mark.parametrize("method", ["lego", "dare_linear", "dare_ties"])
def test_seed_option_is_bounded(method, seed, ok):
    if ok:
        assert merging.validate_options(method, {"seed": seed})["seed"] == seed
        return
    with pytest.raises(merging.InvalidMergeOptions) as caught:
        merging.validate_options(method, {"seed": seed})
    assert caught.value.param == "seed" and "4294967295" in str(caught.value)


def test_max_seed_merges():
    adapters = [random_adapter(1), random_adapter(2)]
    result = merging.merge(adapters, None, "lego", rank=4, options={"seed": 2**32 - 1})
    assert result.adapter.max_rank == 4


@pytest.mark.parametrize("method", ["svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_decomposition_that_does_not_converge_is_merge_failed(method):
    adapters = [random_adapter(1), random_adapter(2)]
    with pytest.raises(merging.MergeFailedError, match="did not converge"):
        merging.merge(adapters, [1e300, 1e300], method, rank=2)


@pytest.mark.parametrize(
    "method", ["cat", "svd", "lego", "ties", "dare_linear", "dare_ties", "magnitude_prune", "knots", "core"]
)
def test_all_zero_result_from_non_zero_inputs_is_merge_failed(method):
    adapters = [random_adapter(1), random_adapter(2)]
    with pytest.raises(merging.MergeFailedError, match="all-zero"):
        merging.merge(adapters, [1e-50, 1e-50], method)


def test_zero_inputs_give_a_zero_adapter_without_error():
    """An untrained adapter (lora_B = 0, peft's initialisation) is a valid no-op input."""
    zero = random_adapter(1)
    for module in zero.modules.values():
        module.lora_b.zero_()
    assert merging.merge([zero], [1.0], "cat").adapter.max_rank == 4


def test_compress_refuses_non_finite_factors():
    adapter = random_adapter(1, rank=8)
    for module in adapter.modules.values():
        module.lora_b.mul_(1e30)
        module.lora_a.mul_(1e30)
    with pytest.raises(merging.MergeFailedError):
        merging.compress(adapter, 2)


def test_merge_failed_maps_to_its_code():
    from server.errors import from_exception

    err = from_exception(merging.MergeFailedError("svd failed in module 'q': did not converge"))
    assert (err.status, err.code, err.param) == (400, "merge_failed", None)
