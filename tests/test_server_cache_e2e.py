"""The composition cache through the real server: memory eviction, restart survival of the
disk cache and of named compositions, and a corrupted disk entry rebuilt."""

from __future__ import annotations

import httpx
import openai
from server_process import ServerProcess

GREEDY = {"temperature": 0, "max_tokens": 8}


def start(root, tiny_base, skills_dir, name: str, **flags) -> ServerProcess:
    return ServerProcess(
        root / f"{name}.log", base_model=tiny_base, skills_dir=skills_dir, served_model_name="tiny",
        cache_dir=root / "cache", **flags,
    )


def text_of(server: ServerProcess, model: str) -> str:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    return client.completions.create(model=model, prompt="The sum of", **GREEDY).choices[0].text


def test_cache_tiers_across_restarts(tiny_base, skills_dir, tmp_path):
    # 1. A fresh server with a one-byte memory tier: each new composition evicts the last.
    first = start(tmp_path, tiny_base, skills_dir, "first", memory_cache_bytes=1)
    try:
        reference = {model: text_of(first, model) for model in ("math+code", "poetry+lookup@svd")}
        assert first.metric("loramix_merges_total") == 2
        assert first.metric("loramix_composition_cache_evictions_total", tier="memory") >= 1
        assert first.metric("loramix_engine_adapter_removals_total") >= 1
        assert text_of(first, "math+code") == reference["math+code"]  # back from the disk tier
        assert first.metric("loramix_composition_cache_hits_total", tier="disk") >= 1
        assert first.metric("loramix_merges_total") == 2
        created = httpx.post(first.url + "/v1/compositions", json={"name": "mc", "model": "math+code"})
        assert created.status_code == 200, created.text
        key = created.json()["key"]
    finally:
        first.stop()

    # 2. After a restart: nothing is merged again, the named composition still resolves.
    second = start(tmp_path, tiny_base, skills_dir, "second")
    try:
        assert text_of(second, "math+code") == reference["math+code"]
        assert text_of(second, "mc") == reference["math+code"]
        assert text_of(second, "poetry+lookup@svd") == reference["poetry+lookup@svd"]
        assert second.metric("loramix_merges_total") == 0
        assert second.metric("loramix_composition_cache_hits_total", tier="disk") == 2
        listed = httpx.get(second.url + "/v1/models").json()["data"]
        assert {"mc", "code*0.5+math*0.5@cat"} <= {card["id"] for card in listed}
    finally:
        second.stop()

    # 3. A corrupted disk entry is detected, discarded and rebuilt to the same result.
    weights = tmp_path / "cache" / key / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    third = start(tmp_path, tiny_base, skills_dir, "third")
    try:
        assert text_of(third, "math+code") == reference["math+code"]
        assert third.metric("loramix_merges_total") == 1
        assert third.metric("loramix_composition_cache_misses_total") == 1
    finally:
        third.stop()
