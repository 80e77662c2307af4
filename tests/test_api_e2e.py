"""End to end: the real server (`loramix serve` in a subprocess, local engine, tiny fp32
model) driven by the official `openai` client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from server_process import ServerProcess

API_KEY = "test-key"
BASE = "tiny"
GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    proc = ServerProcess(
        root / "server.log",
        base_model=tiny_base,
        skills_dir=skills_dir,
        served_model_name=BASE,
        cache_dir=root / "cache",
        api_key=API_KEY,
        max_lora_rank=16,
        engine="local",
    )
    proc.cache_dir = root / "cache"
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client, model, content="What is two plus three?", **kwargs):
    params = {**GREEDY, **kwargs}
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **params)


def complete(client, model, prompt="The sum of", **kwargs):
    return client.completions.create(model=model, prompt=prompt, **{**GREEDY, **kwargs})


# ---------------------------------------------------------------- models


def test_models_lists_base_and_skills(client):
    ids = [model.id for model in client.models.list()]
    assert ids[0] == BASE
    assert {"math", "code", "poetry", "lookup"} <= set(ids)


# ---------------------------------------------------------------- completions


def test_chat_non_streaming_fills_usage_and_applies_the_composition(client):
    composed = chat(client, "math+code")
    base = chat(client, BASE)
    assert composed.model == "math+code"
    assert composed.object == "chat.completion"
    choice = composed.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert composed.usage.prompt_tokens > 0
    assert 0 < composed.usage.completion_tokens <= 8
    assert composed.usage.total_tokens == composed.usage.prompt_tokens + composed.usage.completion_tokens
    assert choice.message.content != base.choices[0].message.content  # the adapter changes the output


def test_chat_streaming_equals_non_streaming(client):
    whole = chat(client, "math+code")
    stream = chat(client, "math+code", stream=True, stream_options={"include_usage": True})
    text, finish, usage, roles = "", None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert roles[0] == "assistant"
    assert text == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_streaming_equals_non_streaming(client):
    whole = complete(client, "math*0.7+code*0.3")
    pieces = [chunk.choices[0].text for chunk in complete(client, "math*0.7+code*0.3", stream=True) if chunk.choices]
    assert "".join(pieces) == whole.choices[0].text
    assert whole.usage.completion_tokens > 0


def test_n_and_several_prompts_number_choices_like_openai(client):
    result = complete(client, "math", prompt=["The sum of", "def add"], n=2, temperature=1.0, seed=7)
    assert [choice.index for choice in result.choices] == [0, 1, 2, 3]
    again = complete(client, "math", prompt=["The sum of", "def add"], n=2, temperature=1.0, seed=7)
    assert [c.text for c in result.choices] == [c.text for c in again.choices]  # seeded sampling repeats
    greedy = complete(client, "math", prompt=["The sum of", "def add"], n=2)
    assert greedy.choices[0].text == greedy.choices[1].text  # greedy choices of one prompt agree


def test_stop_string_cuts_the_output(client):
    full = complete(client, "code", max_tokens=12).choices[0].text
    stop = full[3:5]
    assert stop and stop in full
    cut = complete(client, "code", max_tokens=12, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


# ---------------------------------------------------------------- composition forms


def test_model_string_and_body_field_give_the_same_composition(client):
    by_string = chat(client, "math*0.7+code*0.3@svd(rank=8)")
    by_body = chat(
        client, BASE,
        extra_body={"composition": {"skills": [{"name": "math", "weight": 0.7}, {"name": "code", "weight": 0.3}],
                                    "method": "svd", "rank": 8}},
    )
    assert by_body.choices[0].message.content == by_string.choices[0].message.content
    assert by_body.model == "code*0.3+math*0.7@svd(rank=8)"


def test_equal_weights_default_matches_explicit_halves(client):
    assert complete(client, "math+code").choices[0].text == complete(client, "code*0.5+math*0.5@cat").choices[0].text


def test_named_composition_lifecycle(server, client):
    http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=120)
    created = http.post("/v1/compositions", json={"name": "mathcode", "model": "math*0.7+code*0.3"})
    assert created.status_code == 200, created.text
    info = created.json()
    assert info["name"] == "mathcode" and info["method"] == "cat" and info["rank"] == 16
    assert info["cached"] == "memory" and info["merge_seconds"] > 0 and info["compressed"] is False
    assert {s["skill"] for s in info["sources"]} == {"math", "code"}
    assert all(len(s["digest"]) == 64 for s in info["sources"])

    assert complete(client, "mathcode").choices[0].text == complete(client, "math*0.7+code*0.3").choices[0].text
    assert "mathcode" in [m.id for m in client.models.list()]
    assert http.get("/v1/compositions/mathcode").json()["key"] == info["key"]
    assert "mathcode" in [c["id"] for c in http.get("/v1/compositions").json()["data"]]

    assert http.delete("/v1/compositions/mathcode").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        complete(client, "mathcode")
    assert http.get("/v1/compositions/mathcode").status_code == 404


def test_rank_over_engine_limit_is_compressed_and_reported(server, client):
    http = httpx.Client(base_url=server.url, headers=server.headers(), timeout=120)
    info = http.post("/v1/compositions", json={"model": "math+lookup"}).json()  # cat rank 8 + 16 > 16
    assert info["compressed"] is True
    assert info["rank"] == 16 and info["rank_before_compression"] == 24
    assert 0 < info["compression_relative_error"] < 1
    assert complete(client, "math+lookup").choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    "model", ["math+code@lego", "math*0.7+lookup*0.3", "math+code@knots", "math+poetry@core(merge=dare_ties)"]
)  # lookup: compressed to 16
def test_served_composition_matches_transformers_with_peft(server, client, tiny_base, model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    served = complete(client, model, max_tokens=12).choices[0].text
    info = httpx.post(server.url + "/v1/compositions", json={"model": model}, headers=server.headers()).json()
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, server.cache_dir / info["key"]).eval()
    prompt = torch.tensor([tokenizer.encode("The sum of")])
    with torch.no_grad():
        output = peft_model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(output[0, prompt.shape[1]:], skip_special_tokens=True)
    assert served == expected


# ---------------------------------------------------------------- errors through the SDK


def check_envelope(exc: openai.APIStatusError, code: str, param: str | None = None) -> dict:
    body = exc.response.json()
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and isinstance(error["code"], str)
    assert error["param"] == param
    assert "/" not in error["message"]
    return error


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        chat(client, "nosuchskill")
    check_envelope(caught.value, "model_not_found", "model")


def test_unknown_skill_in_a_composition_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        complete(client, "math+nosuchskill@lego")
    check_envelope(caught.value, "model_not_found", "model")


def test_malformed_composition_string_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math*0.5+code")
    check_envelope(caught.value, "invalid_composition", "model")


def test_bad_method_option_in_body_names_the_option(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, BASE, extra_body={"composition": {"skills": {"math": 1}, "method": "lego",
                                                           "options": {"max_iter": 0}}})
    check_envelope(caught.value, "invalid_composition", "composition.options.max_iter")


def test_bad_inner_merge_rule_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math+code@knots(merge=average)")
    error = check_envelope(caught.value, "invalid_composition", "model")
    assert "merge" in error["message"] and "ties" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math+code@knots(merge=linear,density=0.3)")
    assert "no effect with merge=linear" in check_envelope(caught.value, "invalid_composition", "model")["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, BASE, extra_body={"composition": {"skills": {"math": 1, "code": 1}, "method": "core",
                                                           "options": {"density": 1.5}}})
    check_envelope(caught.value, "invalid_composition", "composition.options.density")


def test_unknown_key_in_composition_body_is_rejected(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, BASE, extra_body={"composition": {"skills": {"math": 1}, "weights": [1]}})
    check_envelope(caught.value, "invalid_request_error", "composition.weights")


def test_validation_errors_are_bad_request_with_param(client):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math", max_tokens=0)
    check_envelope(caught.value, "invalid_request_error", "max_tokens")


def test_unknown_openai_fields_are_ignored(client):
    result = complete(client, "math", extra_body={"some_future_field": {"x": 1}})
    assert result.choices[0].text == complete(client, "math").choices[0].text


def test_wrong_api_key_is_authentication_error(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        bad.models.list()
    error = check_envelope(caught.value, "invalid_api_key")
    assert error["type"] == "authentication_error"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


def test_unknown_route_and_method_use_the_envelope(server):
    missing = httpx.get(server.url + "/v1/nothing", headers=server.headers())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.delete(server.url + "/v1/models", headers=server.headers())
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_error_after_stream_started_is_an_sse_error_event_then_done(server):
    too_long = "x " * 2000  # longer than the tiny model's context
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", headers=server.headers(), timeout=120,
        json={"model": "math", "stream": True, "messages": [{"role": "user", "content": too_long}]},
    ) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error"


# ---------------------------------------------------------------- concurrency and metrics


def test_sixteen_concurrent_requests_for_a_new_composition_merge_once(server):
    merges_before = server.metric("loramix_merges_total", method="svd")

    async def burst():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        calls = [
            aclient.completions.create(model="poetry*0.4+math*0.6@svd(rank=6)", prompt="Roses", **GREEDY)
            for _ in range(16)
        ]
        return await asyncio.gather(*calls)

    results = asyncio.run(burst())
    assert len({r.choices[0].text for r in results}) == 1
    assert server.metric("loramix_merges_total", method="svd") - merges_before == 1


def test_concurrent_different_compositions_match_their_solo_outputs(client, server):
    models = ["math", "code", "poetry", "lookup", "math+code", "code+poetry@svd", "math*0.3+lookup*0.7", BASE]
    solo = {model: complete(client, model, prompt="Tell me", max_tokens=10).choices[0].text for model in models}

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
        calls = [aclient.completions.create(model=m, prompt="Tell me", temperature=0, max_tokens=10) for m in models]
        return await asyncio.gather(*calls)

    concurrent = {m: r.choices[0].text for m, r in zip(models, asyncio.run(together()))}
    assert concurrent == solo
    assert len(set(solo.values())) > 1


def test_metrics_expose_the_documented_families(server, client):
    complete(client, "math")
    text = server.metrics()
    for family in [
        "loramix_requests_total", "loramix_errors_total", "loramix_prompt_tokens_total",
        "loramix_completion_tokens_total", "loramix_time_to_first_token_seconds_bucket",
        "loramix_inter_token_latency_seconds_bucket", "loramix_composition_cache_hits_total",
        "loramix_composition_cache_misses_total", "loramix_merge_seconds_bucket", "loramix_merges_total",
        "loramix_engine_adapter_loads_total",
    ]:
        assert family in text, family
    assert server.metric("loramix_requests_total", endpoint="/v1/completions", status="200") > 0
    assert server.metric("loramix_errors_total", code="model_not_found") > 0


def test_client_disconnect_mid_stream_aborts_the_sequence(server):
    aborted_before = server.metric("loramix_aborted_sequences_total")
    with httpx.stream(
        "POST", server.url + "/v1/completions", headers=server.headers(), timeout=120,
        json={"model": "math", "prompt": "Once", "stream": True, "max_tokens": 1000, "ignore_eos": True},
    ) as response:
        lines = response.iter_lines()
        received = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
    assert received  # the stream had started; leaving the block closes the connection
    health = wait_for(lambda: server.metric("loramix_aborted_sequences_total") > aborted_before and
                      server.health()["engine"]["num_running"] == 0 and server.health()["engine"]["num_waiting"] == 0)
    assert health


def wait_for(condition, limit_s: float = 60.0) -> bool:
    """Poll `condition` until it holds or `limit_s` passes (a readiness wait, not a timing check)."""
    import time

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("field, value", [("suffix", " end"), ("logit_bias", {"7": 5}), ("best_of", 3)])
def test_unsupported_openai_features_are_refused_not_ignored(client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, "math", extra_body={field: value})
    check_envelope(caught.value, "invalid_request_error", field)


def test_server_timing_reports_the_composition_step(server):
    response = httpx.post(server.url + "/v1/completions", headers=server.headers(),
                          json={"model": "math+code", "prompt": "x", "max_tokens": 1})
    assert response.headers["server-timing"].startswith("compose;dur=")
