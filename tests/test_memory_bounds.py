"""What the server keeps per composition and per request stays bounded under a stream of new
compositions and clients that hang up (the soak bench's load, in miniature): only the
compositions in the memory tier keep an engine id and a registered adapter, and nothing is
left of finished or abandoned requests."""

from __future__ import annotations

import gc
import tracemalloc

from fastapi.testclient import TestClient

from server.app import create_app
from server.engines.local import LocalEngine, LocalSettings
from server.settings import Settings

BASE = "tiny"
NUM_COMPOSITIONS = 24
MAX_LORAS = 2


def new_composition(i: int) -> str:
    weight = round(0.05 + 0.9 * i / NUM_COMPOSITIONS, 4)
    return f"math*{weight}+code*{round(1 - weight, 4)}"


def request(client: TestClient, model: str, hang_up: bool) -> None:
    body = {"model": model, "prompt": "The sum of", "max_tokens": 6, "temperature": 0, "stream": hang_up}
    if not hang_up:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event, then the client goes away


def test_new_compositions_and_hang_ups_leave_bounded_state(tiny_base, skills_dir, tmp_path):
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, served_model_name=BASE, cache_dir=tmp_path,
                        memory_cache_bytes=1, disk_cache_bytes=1, disk_cache_grace_seconds=0.5)
    engine = LocalEngine(tiny_base, LocalSettings(max_lora_rank=16, max_loras=MAX_LORAS))
    with TestClient(create_app(settings, engine=engine)) as client:
        state = client.app.state.loramix
        for i in range(4):  # first use of every code path: imports, lazy tables
            request(client, new_composition(i), hang_up=i % 2 == 1)
        gc.collect()
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        for i in range(4, NUM_COMPOSITIONS):
            request(client, new_composition(i), hang_up=i % 2 == 1)
            request(client, "math", hang_up=i % 3 == 0)
        gc.collect()
        grown, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()

        composer, cache, slots = state.composer, state.composer.cache, engine._slots
        num_in_memory = len(cache._memory)
        assert num_in_memory <= 2  # a 1-byte tier keeps the entry just admitted
        ids = composer.adapters.ids
        assert len(ids._by_key) == len(ids._by_id) == num_in_memory
        names = composer.adapters.names
        assert len(names._by_key) == len(names._by_name) == num_in_memory
        assert len(slots._handles) <= num_in_memory and not slots._staged.keys() - slots._handles.keys()
        assert len(slots._resident) <= MAX_LORAS and not slots._pins
        assert not cache._inflight and not engine._requests and not engine._waiting
        assert engine.health()["num_running"] == 0
        # 20 merges and 40 requests keep 114 KiB (first-use caches); with safetensors' mmap
        # backend (1.5 KiB traced per adapter load) they kept 262 KiB.
        assert grown - before < 192 * 1024, f"{(grown - before) / 1024:.0f} KiB kept"
