"""The local engine against transformers + peft, and its batching, slots and stream semantics.

fp32 tiny model throughout, so greedy tokens must agree exactly."""

from __future__ import annotations

import asyncio

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import merging
from server.engines.base import AdapterHandle, EngineError, SamplingOptions
from server.engines.local import AdapterRankError, LocalEngine, LocalSettings

GREEDY = SamplingOptions(max_tokens=12, temperature=0.0)
SKILLS = ("math", "code", "poetry", "lookup")
RANKS = {"math": 8, "code": 8, "poetry": 4, "lookup": 16}
PROMPTS = ("What is 2+3?", "Write a poem about the sea.", "def add(a, b):", "Paris is")


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True)["input_ids"]
            for p in PROMPTS]


@pytest.fixture(scope="module")
def handles(skills_dir, tmp_path_factory):
    """One handle per skill plus a cat merge of math and code (0.5 each)."""
    out = {name: AdapterHandle(i + 1, name, skills_dir / name, RANKS[name])
           for i, name in enumerate(SKILLS)}
    merged = merging.merge([merging.load_adapter(skills_dir / "math"),
                            merging.load_adapter(skills_dir / "code")], [0.5, 0.5], method="cat")
    path = merged.adapter.save(tmp_path_factory.mktemp("merged") / "math+code")
    out["math+code"] = AdapterHandle(10, "math+code", path, merged.adapter.max_rank)
    return out


def run_engine(tiny_base, scenario, **options):
    """Start a LocalEngine, run `scenario(engine)` on a fresh event loop, shut it down."""
    async def main():
        engine = LocalEngine(tiny_base, LocalSettings(**options))
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


async def collect(engine, request_id, prompt, sampling=GREEDY, adapter=None):
    """(token ids, text, finish_reason, last delta) of one request."""
    tokens, text, last = [], "", None
    async for delta in engine.generate(request_id, prompt, sampling, adapter):
        tokens += delta.token_ids
        text += delta.text
        last = delta
    return tokens, text, last.finish_reason, last


def hf_greedy(tiny_base, prompt, max_new_tokens, adapter_dir=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=max_new_tokens)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["math+code", "poetry", None])
def test_greedy_matches_transformers_and_peft(tiny_base, handles, prompts, name):
    handle = handles[name] if name else None
    expected = hf_greedy(tiny_base, prompts[0], GREEDY.max_tokens,
                         handle.path if handle else None)

    async def scenario(engine):
        return await collect(engine, "r", prompts[0], adapter=handle)

    tokens, _, _, _ = run_engine(tiny_base, scenario)
    assert tokens == expected


def _mixed_requests(handles, prompts):
    names = [None, "math", "code", "poetry", "lookup", "math+code", "math", None]
    return [(f"req{i}", prompts[i % len(prompts)], handles[n] if n else None)
            for i, n in enumerate(names)]


def test_concurrent_mixed_adapters_equal_solo(tiny_base, handles, prompts):
    requests = _mixed_requests(handles, prompts)

    async def scenario(engine):
        solo = [await collect(engine, rid + "-solo", p, adapter=h) for rid, p, h in requests]
        passes_before = engine.health()["num_forward_passes"]
        together = await asyncio.gather(*(collect(engine, rid, p, adapter=h)
                                          for rid, p, h in requests))
        health = engine.health()
        return solo, together, health["num_forward_passes"] - passes_before, health

    solo, together, num_passes, health = run_engine(tiny_base, scenario)
    assert len({tuple(s[0]) for s in solo}) >= 6  # the adapters really differ
    # They ran together: 6 adapter slots + base in one pass, far fewer passes than 8 x 12.
    assert health["max_adapters_per_pass"] == 6
    assert num_passes <= 2 * GREEDY.max_tokens
    assert [t[0] for t in together] == [s[0] for s in solo]
    assert [t[1] for t in together] == [s[1] for s in solo]


def test_lru_eviction_and_small_batches_keep_outputs(tiny_base, handles, prompts):
    requests = _mixed_requests(handles, prompts)

    async def reference(engine):
        return [(await collect(engine, rid, p, adapter=h))[0] for rid, p, h in requests]

    async def squeezed(engine):
        together = await asyncio.gather(*(collect(engine, rid, p, adapter=h)
                                          for rid, p, h in requests))
        return [t[0] for t in together], engine.health()

    expected = run_engine(tiny_base, reference)
    got, health = run_engine(tiny_base, squeezed, max_loras=2, max_batch_size=3)
    assert got == expected
    assert len(health["loaded_adapters"]) <= 2
    assert health["adapter_loads"] >= 5  # five distinct adapters through two slots


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_max_tokens_gives_length_and_usage(tiny_base, handles, prompts, max_tokens):
    async def scenario(engine):
        return await collect(engine, "r", prompts[1], SamplingOptions(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True), handles["code"])

    tokens, _, finish, last = run_engine(tiny_base, scenario)
    assert finish == "length" and len(tokens) == max_tokens
    assert (last.num_prompt_tokens, last.num_output_tokens) == (len(prompts[1]), max_tokens)


def test_stop_string_is_cut(tiny_base, handles, prompts):
    long = SamplingOptions(max_tokens=16, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        tokens, text, _, _ = await collect(engine, "full", prompts[2], long, handles["math"])
        # A two-character stop string from the second half, free of replacement characters.
        stop = next(text[i:i + 2] for i in range(len(text) // 2, len(text) - 1)
                    if "\ufffd" not in text[i:i + 2])
        cut = await collect(engine, "cut", prompts[2],
                            SamplingOptions(max_tokens=16, temperature=0.0, stop=(stop,)),
                            handles["math"])
        return text, stop, cut

    text, stop, (tokens, cut_text, finish, _) = run_engine(tiny_base, scenario)
    assert finish == "stop"
    assert cut_text == text[:text.index(stop)]
    assert len(tokens) < 16


def test_deltas_join_to_the_full_decode(tiny_base, handles, prompts, tokenizer):
    async def scenario(engine):
        return await asyncio.gather(*(collect(engine, f"r{i}", p, adapter=handles[n])
                                      for i, (p, n) in enumerate(zip(prompts, SKILLS))))

    for tokens, text, _, _ in run_engine(tiny_base, scenario):
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_base, handles, prompts):
    def sampled(seed):
        return SamplingOptions(max_tokens=10, temperature=1.0, top_p=0.9, seed=seed)

    async def scenario(engine):
        alone = await collect(engine, "a", prompts[0], sampled(7), handles["poetry"])
        crowd = await asyncio.gather(
            collect(engine, "b", prompts[0], sampled(7), handles["poetry"]),
            collect(engine, "c", prompts[1], sampled(8), handles["math"]),
            collect(engine, "d", prompts[0], sampled(9), handles["poetry"]))
        greedy = await collect(engine, "g", prompts[0], GREEDY, handles["poetry"])
        return alone[0], [c[0] for c in crowd], greedy[0]

    alone, crowd, greedy = run_engine(tiny_base, scenario)
    assert crowd[0] == alone
    assert crowd[2] != alone and alone[:10] != greedy[:10]


def test_abort_frees_the_slot(tiny_base, handles, prompts):
    endless = SamplingOptions(max_tokens=10_000, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        stream = engine.generate("long", prompts[0], endless, handles["math"])
        first = await anext(stream)
        # One slot, pinned by "long": a "code" request waits, and can be aborted while waiting.
        queued = asyncio.create_task(collect(engine, "queued", prompts[1], GREEDY,
                                             handles["code"]))
        while engine.health()["num_waiting"] == 0:
            await asyncio.sleep(0.01)
        await engine.abort("queued")
        queued_result = await queued
        await engine.abort("long")
        rest = [delta async for delta in stream]
        # "code" can run now only if the aborted request released "math"'s slot.
        after = await asyncio.wait_for(
            collect(engine, "next", prompts[0], GREEDY, handles["code"]), timeout=120)
        return first, queued_result, rest, after, engine.health()

    first, queued, rest, after, health = run_engine(tiny_base, scenario, max_loras=1)
    assert first.finish_reason is None
    assert queued[0] == [] and queued[2] == "abort"
    assert rest[-1].finish_reason == "abort"
    assert after[2] == "length" and len(after[0]) == GREEDY.max_tokens
    assert health["loaded_adapters"] == {"code": 0}


def test_closing_the_stream_frees_the_slot(tiny_base, handles, prompts):
    endless = SamplingOptions(max_tokens=10_000, temperature=0.0, ignore_eos=True)

    async def scenario(engine):
        stream = engine.generate("long", prompts[0], endless, handles["math"])
        await anext(stream)
        await stream.aclose()  # what the server does when a client disconnects
        return await asyncio.wait_for(
            collect(engine, "next", prompts[0], GREEDY, handles["code"]), timeout=120)

    tokens, _, finish, _ = run_engine(tiny_base, scenario, max_loras=1)
    assert finish == "length" and len(tokens) == GREEDY.max_tokens


def test_rank_over_limit_is_rejected(tiny_base, handles, prompts):
    understated = AdapterHandle(99, "understated", handles["lookup"].path, 8)

    async def scenario(engine):
        with pytest.raises(AdapterRankError, match="rank 16, above .* max_lora_rank 8"):
            await engine.add_adapter(handles["lookup"])
        # A handle that understates its rank is caught when the file is read.
        with pytest.raises(AdapterRankError, match="rank 16") as caught:
            await engine.add_adapter(understated)
        with pytest.raises(EngineError):
            await collect(engine, "r", prompts[0], adapter=handles["lookup"])
        ok = await collect(engine, "ok", prompts[0], adapter=handles["math"])
        return ok, str(caught.value)

    (tokens, _, finish, _), message = run_engine(tiny_base, scenario, max_lora_rank=8)
    assert finish == "length" and len(tokens) == GREEDY.max_tokens
    assert str(handles["lookup"].path.parent) not in message


def test_client_errors_and_health(tiny_base, prompts):
    from server.engines.base import EngineRequestError
    from server.errors import from_exception

    async def scenario(engine):
        codes = []
        for prompt, sampling in (([], GREEDY), ([1] * 1024, GREEDY), ([10**6], GREEDY),
                                 (prompts[0], SamplingOptions(max_tokens=0))):
            with pytest.raises(EngineRequestError) as caught:
                await collect(engine, "bad", prompt, sampling)
            error = from_exception(caught.value)
            codes.append((error.status, error.code, error.param))
        return codes, engine.health()

    codes, health = run_engine(tiny_base, scenario)
    assert codes == [(400, "invalid_request_error", "prompt"),
                     (400, "context_length_exceeded", "prompt"),
                     (400, "invalid_request_error", "prompt"),
                     (400, "invalid_request_error", "max_tokens")]
    assert health["engine"] == "local" and health["num_running"] == health["num_waiting"] == 0
