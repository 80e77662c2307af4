"""Every OpenAI and vLLM sampling field: honoured as vLLM specifies it (local engine, tiny fp32
model; the batched logits ops against a per-token reference), passed through to vLLM's
SamplingParams, or refused with a 400 that names it."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from server_process import ServerProcess
from transformers import AutoTokenizer

from server.engines.base import SamplingOptions
from server.engines.local import LocalEngine, LocalSettings
from server.engines.local import logits as ops
from server.engines.local.sampling import TokenSampler, sample_rows
from server.protocol import _UNSUPPORTED, IGNORED_FIELDS, CompletionRequest
from server.serving.completions import sampling_options
from tests.optional_deps import require_module

BASE = "tiny"
VOCAB = 48


# ---------------------------------------------------------------- batched ops vs a reference


def _reference_penalties(logits, prompt, output, presence, frequency, repetition):
    """vLLM's penalties on one row, token by token."""
    out = logits.clone()
    for token in range(out.shape[0]):
        if token in prompt or token in output:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        out[token] -= frequency * output.count(token) + presence * (token in output)
    return out


def test_penalties_match_the_reference_row_by_row():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen) * 3
    prompts = [[1, 2, 3], [5, 5], [7], []]
    outputs = [[3, 3, 4], [], [9, 9, 9, 1], [2]]
    params = [(0.5, 0.2, 1.3), (-1.0, 2.0, 0.7), (2.0, -2.0, 1.0), (0.0, 0.0, 1.0)]
    got = ops.apply_penalties(
        logits.clone(), ops.token_counts(prompts, VOCAB), ops.token_counts(outputs, VOCAB),
        presence=torch.tensor([p[0] for p in params]), frequency=torch.tensor([p[1] for p in params]),
        repetition=torch.tensor([p[2] for p in params]))
    for i, (presence, frequency, repetition) in enumerate(params):
        want = _reference_penalties(logits[i], prompts[i], outputs[i], presence, frequency, repetition)
        torch.testing.assert_close(got[i], want)
    torch.testing.assert_close(got[3], logits[3])  # all off: the row is untouched


def test_min_p_and_top_k_match_their_definitions():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=gen)
    probs = torch.softmax(logits, -1)
    kept = torch.isfinite(ops.apply_min_p(logits.clone(), torch.tensor([0.0, 0.5, 1.0])))
    assert kept[0].all()
    assert torch.equal(kept[1], probs[1] >= 0.5 * probs[1].max())
    assert kept[2].sum() == 1 and kept[2][probs[2].argmax()]
    kept = torch.isfinite(ops.apply_top_k(logits.clone(), torch.tensor([0, 5, -1])))
    assert kept[0].all() and kept[2].all()
    assert set(kept[1].nonzero().flatten().tolist()) == set(logits[1].topk(5).indices.tolist())


def test_rows_with_different_settings_draw_as_they_would_alone():
    """Per-row isolation: each row's token is the one it draws in a batch of its own."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, VOCAB, generator=gen)
    options = [SamplingOptions(temperature=0.0), SamplingOptions(temperature=0.9, seed=1, top_k=3),
               SamplingOptions(temperature=1.3, seed=2, min_p=0.2, presence_penalty=1.0),
               SamplingOptions(temperature=0.0, repetition_penalty=1.8, min_tokens=2),
               SamplingOptions(temperature=0.7, seed=3, top_p=0.5, frequency_penalty=-0.5)]
    prompts, outputs = [[1, 2]] * 5, [[4, 4], [5], [6, 7], [], [8]]
    eos = frozenset({int(logits[3].argmax())})
    batch = sample_rows([TokenSampler(o, eos) for o in options], logits, prompts, outputs)
    alone = [sample_rows([TokenSampler(o, eos)], logits[i:i + 1], [prompts[i]], [outputs[i]])[0]
             for i, o in enumerate(options)]
    assert batch == alone
    assert batch[3] != int(logits[3].argmax())  # min_tokens held the EOS back


def test_top_k_one_and_min_p_one_are_greedy():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    for options in (SamplingOptions(temperature=1.5, top_k=1), SamplingOptions(temperature=1.5, min_p=1.0)):
        sampler = TokenSampler(options)
        assert {sampler.sample(logits) for _ in range(30)} == {int(logits.argmax())}


def test_min_tokens_suppresses_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(VOCAB)
    logits[[0, 5, 9]] = torch.tensor([10.0, 9.0, 8.0])  # EOS 0, stop id 5, then 9
    sampler = TokenSampler(SamplingOptions(temperature=0.0, min_tokens=2, stop_token_ids=(5,)), frozenset({0}))
    assert sampler.sample(logits, output_token_ids=[9]) == 9
    assert sampler.sample(logits, output_token_ids=[9, 9]) == 0
    # ignore_eos still holds EOS back before min_tokens, as vLLM's min_tokens processor does
    sampler = TokenSampler(SamplingOptions(temperature=0.0, min_tokens=1, ignore_eos=True), frozenset({0}))
    assert sampler.sample(logits) == 5


# ---------------------------------------------------------------- the local engine


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def engine_runs(tiny_base, tokenizer):
    """{case: (token ids, text, finish_reason)}, every case run on one engine, concurrently."""
    prompt = tokenizer.encode("The the the sum of", add_special_tokens=False)
    base = dict(max_tokens=16, ignore_eos=True)
    cases = {
        "greedy": SamplingOptions(temperature=0.0, **base),
        "top_k=1": SamplingOptions(temperature=1.0, seed=7, top_k=1, **base),
        "top_k=-1": SamplingOptions(temperature=1.0, seed=7, top_k=-1, **base),
        "default seed 7": SamplingOptions(temperature=1.0, seed=7, **base),
        "min_p=1": SamplingOptions(temperature=1.0, seed=7, min_p=1.0, **base),
        "repetition=100": SamplingOptions(temperature=0.0, repetition_penalty=100.0, **base),
        "presence=2": SamplingOptions(temperature=0.0, presence_penalty=2.0, **base),
        "frequency=2": SamplingOptions(temperature=0.0, frequency_penalty=2.0, **base),
    }

    async def scenario(engine):
        async def one(name, sampling):
            tokens, text, finish = [], "", None
            async for delta in engine.generate(name, prompt, sampling):
                tokens += delta.token_ids
                text += delta.text
                finish = delta.finish_reason
            return name, (tokens, text, finish)
        return dict(await asyncio.gather(*(one(n, s) for n, s in cases.items())))

    async def main():
        engine = LocalEngine(tiny_base, LocalSettings(device="cpu"))
        await engine.start()
        try:
            # The greedy first token is made a stop token: it ends the sequence at once, unless
            # min_tokens holds it back.
            first = await _first_greedy(engine, prompt)
            cases["eos first"] = SamplingOptions(temperature=0.0, max_tokens=8, stop_token_ids=(first,))
            cases["min_tokens=6"] = SamplingOptions(temperature=0.0, max_tokens=8, min_tokens=6,
                                                    stop_token_ids=(first,))
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def _first_greedy(engine, prompt):
    async for delta in engine.generate("probe", prompt, SamplingOptions(temperature=0.0, max_tokens=1)):
        return delta.token_ids[0]


def test_top_k_1_and_min_p_1_equal_greedy_and_top_k_off_equals_default(engine_runs):
    assert engine_runs["top_k=1"][0] == engine_runs["greedy"][0]
    assert engine_runs["min_p=1"][0] == engine_runs["greedy"][0]
    assert engine_runs["top_k=-1"][0] == engine_runs["default seed 7"][0]


def test_greedy_repeats_and_a_huge_repetition_penalty_prevents_any_repeat(engine_runs):
    greedy = engine_runs["greedy"][0]
    assert len(set(greedy)) < len(greedy)  # the tiny model loops when left alone
    tokens = engine_runs["repetition=100"][0]
    assert len(tokens) == 16 and len(set(tokens)) == len(tokens)


def test_presence_and_frequency_penalties_change_greedy_output(engine_runs):
    greedy = engine_runs["greedy"][0]
    for case in ("presence=2", "frequency=2"):
        tokens = engine_runs[case][0]
        assert tokens != greedy
        assert max(tokens.count(t) for t in tokens) <= max(greedy.count(t) for t in greedy)


def test_stop_token_ids_stop_and_min_tokens_forbids_the_early_stop(engine_runs):
    tokens, text, finish = engine_runs["eos first"]
    assert (len(tokens), finish, text) == (1, "stop", "")  # the stop token's text is left out
    tokens, _, finish = engine_runs["min_tokens=6"]
    assert len(tokens) >= 6 and tokens[0] != engine_runs["eos first"][0][0]
    assert finish == "stop" or len(tokens) == 8


# ---------------------------------------------------------------- through the HTTP API


@pytest.fixture(scope="module")
def server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    proc = ServerProcess(root / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                         served_model_name=BASE, cache_dir=root / "cache", max_lora_rank=16,
                         engine="local", max_model_len=64)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _complete(client, **kwargs):
    params = {"model": "math", "prompt": "The the sum of", "max_tokens": 12, "temperature": 0, **kwargs}
    return client.completions.create(**params)


def test_each_extension_reaches_the_engine(client):
    """Each field changes the answer the way it should, through the openai client."""
    greedy = _complete(client, extra_body={"ignore_eos": True}).choices[0]
    seeded = dict(temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    assert _complete(client, **{**seeded, "extra_body": {"ignore_eos": True, "top_k": 1}}).choices[0].text == greedy.text
    assert _complete(client, **{**seeded, "extra_body": {"ignore_eos": True, "min_p": 1.0}}).choices[0].text == greedy.text
    for field in ("presence_penalty", "frequency_penalty"):
        penalized = _complete(client, **{field: 2.0}, extra_body={"ignore_eos": True}).choices[0]
        assert penalized.text != greedy.text, field
    repeated = _complete(client, extra_body={"ignore_eos": True, "repetition_penalty": 100.0}).choices[0]
    assert repeated.text != greedy.text
    upto = greedy.text[: max(1, len(greedy.text) // 2)].strip()[-2:]
    stopped = _complete(client, stop=[upto], extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert stopped.choices[0].text.endswith(upto)


def test_min_tokens_over_max_tokens_is_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, max_tokens=4, extra_body={"min_tokens": 5})
    assert caught.value.body["param"] == "min_tokens"


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.1), ("repetition_penalty", 0),
    ("top_k", -2), ("min_p", 1.5), ("min_tokens", -1), ("stop_token_ids", [-1]),
    ("stop_token_ids", [10**6]), ("temperature", 2.5), ("top_p", 0),
])
def test_out_of_range_values_are_a_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, extra_body={field: value})
    assert caught.value.body["param"].split(".")[0] == field


@pytest.mark.parametrize("field, value", sorted(
    (name, {"x": 1} if name not in ("use_beam_search",) else True) for name in _UNSUPPORTED))
def test_unhonoured_fields_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, extra_body={field: value})
    assert caught.value.body["param"] == field and caught.value.body["code"] == "invalid_request_error"


def test_harmless_fields_are_accepted_and_ignored(client):
    plain = _complete(client).choices[0].text
    extra = {name: "x" for name in IGNORED_FIELDS if name != "user"}
    assert _complete(client, user="u", extra_body=extra).choices[0].text == plain


def test_max_tokens_beyond_the_context_is_a_400_not_a_clamp(client):
    with pytest.raises(openai.BadRequestError) as caught:
        _complete(client, max_tokens=64)
    body = caught.value.body
    assert (body["code"], body["param"]) == ("context_length_exceeded", "max_tokens")
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                       max_completion_tokens=64)
    assert caught.value.body["param"] == "max_completion_tokens"
    # Without max_tokens, generation stops at the context's end.
    reply = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length" and reply.usage.total_tokens <= 64


def test_a_too_long_prompt_names_the_endpoints_prompt_field(client):
    for call, param in ((lambda: _complete(client, prompt="x " * 200), "prompt"),
                        (lambda: client.chat.completions.create(
                            model="math", messages=[{"role": "user", "content": "x " * 200}]), "messages")):
        with pytest.raises(openai.BadRequestError) as caught:
            call()
        assert (caught.value.body["code"], caught.value.body["param"]) == ("context_length_exceeded", param)


def test_models_retrieve_answers_every_servable_model(client):
    assert client.models.retrieve(BASE).id == BASE
    assert client.models.retrieve("math").parent == BASE
    card = client.models.retrieve("math+code@lego")
    assert card.id == "math+code@lego" and card.model_extra["loramix"]["kind"] == "composition"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nosuchskill")


def test_request_gauges_and_lora_info_metric(server, client):
    _complete(client)
    assert server.metric("loramix_num_requests_running") == 0
    assert server.metric("loramix_num_requests_waiting") == 0
    text = server.metrics()
    assert 'vllm:lora_requests_info{max_lora="8",running_lora_adapters="",waiting_lora_adapters=""}' in text


# ---------------------------------------------------------------- the vLLM engine, unit level


def test_every_option_reaches_vllms_sampling_params():
    require_module("vllm")
    from server.engines.vllm.engine import _sampling_params

    request = CompletionRequest(
        model="m", prompt="x", temperature=0.5, top_p=0.9, seed=3, stop=["END"], presence_penalty=0.5,
        frequency_penalty=-0.25, repetition_penalty=1.2, top_k=7, min_p=0.05, min_tokens=2,
        stop_token_ids=[4, 9], include_stop_str_in_output=True, skip_special_tokens=False, ignore_eos=True)
    params = _sampling_params(sampling_options(request, max_tokens=10))
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (10, 0.5, 0.9, 3, ["END"])
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -0.25, 1.2)
    assert (params.top_k, params.min_p, params.min_tokens, params.stop_token_ids) == (7, 0.05, 2, [4, 9])
    assert params.include_stop_str_in_output and not params.skip_special_tokens and params.ignore_eos
    defaults = _sampling_params(sampling_options(CompletionRequest(model="m", prompt="x"), max_tokens=4))
    assert (defaults.presence_penalty, defaults.repetition_penalty, defaults.top_k, defaults.min_p) == (0, 1, 0, 0)


def test_a_tiny_repetition_penalty_keeps_the_distribution_defined():
    logits = torch.tensor([3.0e38, 1.0, -2.0, 0.5])
    sampler = TokenSampler(SamplingOptions(temperature=1.0, seed=0, repetition_penalty=1e-30))
    assert sampler.sample(logits, prompt_token_ids=[0, 1]) == 0
