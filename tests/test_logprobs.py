"""Logprobs, echo and the tokenizer endpoints: values against transformers' own log_softmax
on the tiny fp32 model (tight tolerance), response shapes as OpenAI's and vLLM's, streaming
equal to non-streaming, and the errors. Engine level (local engine) and end to end (real
server, official `openai` client)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import torch
from server_process import ServerProcess
from transformers import AutoModelForCausalLM, AutoTokenizer

from server.engines.base import SamplingOptions
from server.engines.local import LocalEngine, LocalSettings

API_KEY = "logprobs-key"
BASE = "tiny"
ATOL = 1e-4  # fp32, same weights: only kernel order differs


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def reference(tiny_base):
    """log_softmax of transformers' logits at every position of `ids`: [len(ids), vocab]."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs


# ---------------------------------------------------------------- engine level


def test_local_engine_logprobs_match_transformers_in_a_mixed_batch(tiny_base, tokenizer, reference):
    """Two prompts of different lengths in one batch (left padding), one asking for logprobs
    and prompt logprobs, one for nothing: the asking one's values are transformers'."""
    short, long = tokenizer.encode("The sum of"), tokenizer.encode("def add(a, b): return a + b and more")
    asking = SamplingOptions(max_tokens=5, temperature=0, logprobs=3, prompt_logprobs=2)

    async def main():
        engine = LocalEngine(tiny_base, LocalSettings(max_batch_size=4))
        await engine.start()
        try:
            async def run(request_id, ids, sampling):
                return [d async for d in engine.generate(request_id, ids, sampling)]
            return await asyncio.gather(run("a", short, asking),
                                        run("b", long, SamplingOptions(max_tokens=5, temperature=0)))
        finally:
            await engine.shutdown()

    deltas, plain = asyncio.run(main())
    assert all(d.logprobs is None and d.prompt_logprobs is None for d in plain)
    output = [t for d in deltas for t in d.token_ids]
    entries = [e for d in deltas for e in d.logprobs]
    prompt = deltas[0].prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    expected = reference(short + output)
    # Prompt: the first token has none; token j is scored by position j - 1.
    assert prompt[0] is None and len(prompt) == len(short)
    for j, entry in enumerate(prompt[1:], start=1):
        assert entry.token_id == short[j]
        assert entry.logprob == pytest.approx(expected[j - 1, short[j]].item(), abs=ATOL)
        assert [t for t, _ in entry.top] == expected[j - 1].topk(2).indices.tolist()
    # Output: greedy, so each sampled token is the top one and its logprob the maximum.
    assert [e.token_id for e in entries] == output and len(output) == 5
    for k, entry in enumerate(entries):
        row = expected[len(short) - 1 + k]
        assert entry.logprob == pytest.approx(row[output[k]].item(), abs=ATOL)
        assert len(entry.top) == 3 and entry.top[0][0] == output[k]
        assert [v for _, v in entry.top] == pytest.approx(row.topk(3).values.tolist(), abs=ATOL)


def test_logprobs_are_raw_not_tempered(tiny_base, tokenizer, reference):
    """vLLM's default logprobs_mode (raw_logprobs): the model's distribution, before the
    temperature and top-p shape the sampling."""
    ids = tokenizer.encode("The sum of")
    sampling = SamplingOptions(max_tokens=3, temperature=1.7, top_p=0.5, seed=3, logprobs=0)

    async def main():
        engine = LocalEngine(tiny_base)
        await engine.start()
        try:
            return [d async for d in engine.generate("t", ids, sampling)]
        finally:
            await engine.shutdown()

    deltas = asyncio.run(main())
    output = [t for d in deltas for t in d.token_ids]
    expected = reference(ids + output)
    for k, entry in enumerate(e for d in deltas for e in d.logprobs):
        assert entry.top == ()
        assert entry.logprob == pytest.approx(expected[len(ids) - 1 + k, output[k]].item(), abs=ATOL)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    proc = ServerProcess(root / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                         served_model_name=BASE, cache_dir=root / "cache", api_key=API_KEY,
                         max_lora_rank=16, engine="local")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def post(server, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60)


def test_completion_logprobs_shape_and_values(client, tokenizer, reference):
    reply = client.completions.create(model=BASE, prompt="The sum of", max_tokens=4, temperature=0, logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    prompt = tokenizer.encode("The sum of")
    # The output tokens: re-tokenizing the text may differ, so read the ids back via the strings.
    n = len(logprobs.tokens)
    assert n == reply.usage.completion_tokens == 4
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == n
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(n)]
    # Greedy: each token is the most likely one; top holds the chosen token and the top 2
    # (keyed by text: byte tokens that decode alike share a key, the later value wins).
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and token in top and max(top.values()) <= value
    first = reference(prompt)[-1]
    assert logprobs.token_logprobs[0] == pytest.approx(first.max().item(), abs=ATOL)


def test_echo_with_max_tokens_0_is_the_prompts_loglikelihood(client, tokenizer, reference):
    """What lm-eval's loglikelihood sends: echo, max_tokens 0, logprobs, token-id prompts."""
    ids = tokenizer.encode("Paris is the capital of France")
    reply = client.completions.create(model=BASE, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert reply.choices[0].text == tokenizer.decode(ids)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = reference(ids)
    values = [expected[j - 1, ids[j]].item() for j in range(1, len(ids))]
    assert logprobs.token_logprobs[1:] == pytest.approx(values, abs=ATOL)
    for j, top in enumerate(logprobs.top_logprobs[1:], start=1):
        best = int(expected[j - 1].argmax())
        assert top[tokenizer.decode([best])] == pytest.approx(expected[j - 1, best].item(), abs=ATOL)


def test_echo_with_generation_and_a_text_prompt(client, tokenizer):
    reply = client.completions.create(model=BASE, prompt="The sum of", max_tokens=3, echo=True, logprobs=0,
                                      temperature=0)
    plain = client.completions.create(model=BASE, prompt="The sum of", max_tokens=3, temperature=0)
    choice = reply.choices[0]
    assert choice.text == "The sum of" + plain.choices[0].text
    num_prompt = len(tokenizer.encode("The sum of"))
    assert len(choice.logprobs.tokens) == num_prompt + 3
    assert choice.logprobs.token_logprobs[0] is None
    assert all(len(top) == 1 for top in choice.logprobs.top_logprobs[1:])  # logprobs 0: the chosen only
    echo_only = client.completions.create(model=BASE, prompt="The sum of", max_tokens=0, echo=True)
    assert echo_only.choices[0].text == "The sum of" and echo_only.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_whole_answer(client):
    kwargs = dict(model=BASE, prompt="The sum of", max_tokens=6, temperature=0, logprobs=2, echo=True)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, values, tops, offsets = [], [], [], []
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            tokens += choice.logprobs.tokens
            values += choice.logprobs.token_logprobs
            tops += choice.logprobs.top_logprobs
            offsets += choice.logprobs.text_offset
    assert (tokens, values, tops, offsets) == (whole.tokens, whole.token_logprobs, whole.top_logprobs,
                                               whole.text_offset)


def test_chat_logprobs_shape_values_and_stream(client, tokenizer, reference):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    kwargs = dict(model=BASE, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    reply = client.chat.completions.create(**kwargs)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    expected = reference(prompt)[-1]
    top = expected.topk(3)
    first = content[0]
    assert first.bytes == list(first.token.encode())
    assert first.logprob == pytest.approx(top.values[0].item(), abs=ATOL)
    assert [e.token for e in first.top_logprobs] == [tokenizer.decode([t]) for t in top.indices.tolist()]
    assert [e.logprob for e in first.top_logprobs] == pytest.approx(top.values.tolist(), abs=ATOL)
    streamed = [entry for chunk in client.chat.completions.create(stream=True, **kwargs)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
])
def test_bad_logprob_requests_are_400(server, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = post(server, path, {"model": BASE, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_request_error" and error["param"] == param


# ---------------------------------------------------------------- tokenizer endpoints


def test_tokenize_and_detokenize_round_trip(server, tokenizer):
    text = "The sum of two and three"
    body = post(server, "/tokenize", {"model": "math+code", "prompt": text}).json()
    assert body["tokens"] == tokenizer.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == server.health()["engine"]["max_model_len"]
    bare = post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert bare["tokens"] == tokenizer.encode(text, add_special_tokens=False)
    back = post(server, "/detokenize", {"model": BASE, "tokens": bare["tokens"]}).json()
    assert back == {"prompt": text}
    messages = [{"role": "user", "content": "hi"}]
    chat = post(server, "/tokenize", {"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_tokenizer_info_names_the_special_tokens(server, tokenizer):
    info = httpx.get(server.url + "/tokenizer_info", headers=server.headers()).json()
    assert info["eos_token"] == tokenizer.eos_token and info["bos_token"] == tokenizer.bos_token
    assert "/" not in json.dumps({k: v for k, v in info.items() if k != "chat_template"})


@pytest.mark.parametrize("path, body, status, code, param", [
    ("/tokenize", {"prompt": "x"}, 401, "invalid_api_key", None),
    ("/tokenize", {"model": "nosuch", "prompt": "x"}, 404, "model_not_found", "model"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "invalid_request_error", None),
    ("/detokenize", {"tokens": [10**9]}, 400, "invalid_request_error", "tokens"),
])
def test_tokenizer_endpoint_errors(server, path, body, status, code, param):
    response = post(server, path, body, key=None if status == 401 else API_KEY)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_tokenizer_endpoints_are_in_the_openapi_document(server):
    document = httpx.get(server.url + "/openapi.json", headers=server.headers()).json()
    for path, method in (("/tokenize", "post"), ("/detokenize", "post"), ("/tokenizer_info", "get")):
        operation = document["paths"][path][method]
        assert {"401", "500"} <= set(operation["responses"]) and "422" not in operation["responses"]
    assert {"400", "404", "413"} <= set(document["paths"]["/tokenize"]["post"]["responses"])
