"""The local engine's static KV cache (the layout its CUDA-graph decode replays), on CPU.

The static runner must give exactly the dynamic runner's greedy tokens (fp32 tiny model)
through everything that moves rows around in its buffers: rows joining with longer prompts
(shift right), rows leaving (compaction), a context limit that forces trimming, a batch
smaller than the requests. CUDA-graph capture itself runs on the GPU machine
(bench/engine_gpu/ checks graph replay against the eager engine token for token). Run on a
GPU host, these tests exercise the CUDA-graph decoder itself: `kv_cache="static"` on CUDA
captures and replays.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.engines.base import AdapterHandle, EngineError, SamplingOptions
from server.engines.local import LocalEngine, LocalSettings
from server.engines.local.static_decode import column_bucket, row_buckets
from server.engines.local.static_kv import StaticKV
from tests.optional_deps import require_module
from tests.test_local_engine import (GREEDY, _mixed_requests, collect, handles, hf_greedy,  # noqa: F401
                                     prompts, run_engine, tokenizer)


def _together(requests, sampling=GREEDY):
    async def scenario(engine):
        outs = await asyncio.gather(*(collect(engine, rid, p, sampling, adapter=h)
                                      for rid, p, h in requests))
        return [o[0] for o in outs], [o[2] for o in outs], engine.health()
    return scenario


def _staggered(requests, sampling=GREEDY):
    """Requests arrive while others run: each starts after the previous one's first tokens."""
    async def scenario(engine):
        tasks = []
        for rid, p, h in requests:
            tasks.append(asyncio.create_task(collect(engine, rid, p, sampling, adapter=h)))
            await asyncio.sleep(0.05)
        outs = await asyncio.gather(*tasks)
        return [o[0] for o in outs], [o[2] for o in outs], engine.health()
    return scenario


def test_static_matches_transformers_and_peft(tiny_base, handles, prompts):
    for name in ("math+code", None):
        handle = handles[name] if name else None
        expected = hf_greedy(tiny_base, prompts[2], GREEDY.max_tokens,
                             handle.path if handle else None)

        async def scenario(engine):
            return (await collect(engine, "r", prompts[2], adapter=handle))[0], engine.health()

        tokens, health = run_engine(tiny_base, scenario, kv_cache="static")
        # On a GPU host the same tests run the CUDA-graph decoder against the dynamic engine.
        assert health["kv_cache"] == "static"
        assert health["cuda_graphs"] is torch.cuda.is_available()
        assert tokens == expected


@pytest.mark.parametrize("arrival", [_together, _staggered])
def test_static_equals_dynamic_for_mixed_batches(tiny_base, handles, prompts, arrival):
    # Prompts of different lengths over 6 adapters + base; max_batch_size 3 makes rows leave
    # and join mid-batch, so the buffers shift, compact and reuse rows.
    requests = _mixed_requests(handles, prompts)
    options = dict(max_batch_size=3, max_loras=4)
    dynamic = run_engine(tiny_base, arrival(requests), kv_cache="dynamic", **options)
    static = run_engine(tiny_base, arrival(requests), kv_cache="static", **options)
    assert dynamic[2]["kv_cache"] == "dynamic" and static[2]["kv_cache"] == "static"
    assert static[0] == dynamic[0] and static[1] == dynamic[1]


def test_static_context_limit_trims_and_finishes_with_length(tiny_base, handles, prompts):
    # max_model_len just above the longest prompt: rows end with "length" and the frame must
    # be trimmed for rows that arrive later to keep decoding.
    longest = max(len(p) for p in prompts)
    requests = _mixed_requests(handles, prompts)
    sampling = SamplingOptions(max_tokens=40, temperature=0.0)
    options = dict(max_batch_size=4, max_model_len=longest + 6)
    dynamic = run_engine(tiny_base, _staggered(requests, sampling), kv_cache="dynamic", **options)
    static = run_engine(tiny_base, _staggered(requests, sampling), kv_cache="static", **options)
    assert static[0] == dynamic[0] and static[1] == dynamic[1]
    assert "length" in static[1]
    assert all(len(p) + len(t) <= longest + 6 for (_, p, _), t in zip(requests, static[0]))


def test_static_kv_buffers_shift_compact_and_trim():
    kv = StaticKV(max_rows=4, max_len=8, device=torch.device("cpu"))

    def layer(rows, width, fill):  # one layer, 1 head, head_dim 1; value = fill + column
        k = (fill + torch.arange(width, dtype=torch.float32)).repeat(rows, 1)
        return [(k.view(rows, 1, width, 1), -k.view(rows, 1, width, 1))]

    kv.append(layer(1, 2, 10.0), torch.tensor([[1, 1]]), [2])
    assert (kv.length, kv.starts) == (2, [0])
    # A longer prompt (3 tokens, second row left-padded to 3) shifts row 0 right by 1.
    kv.append(layer(2, 3, 20.0), torch.tensor([[1, 1, 1], [0, 1, 1]]), [3, 2])
    assert (kv.length, kv.starts) == (3, [1, 0, 1])
    assert kv.keys[0][0, 0, 1:3, 0].tolist() == [10.0, 11.0]
    assert kv.mask[:3, :3].tolist() == [[False, True, True], [True, True, True],
                                        [False, True, True]]
    kv.keep([0, 2])  # row 1 (the only one using column 0) leaves: row 2 moves to 1, trimmed
    assert (kv.length, kv.starts) == (2, [0, 0])
    assert kv.keys[0][1, 0, :2, 0].tolist() == [21.0, 22.0]
    assert kv.values[0][0, 0, :2, 0].tolist() == [-10.0, -11.0]
    assert kv.mask[:2, :2].all() and not kv.mask[:2, 2:].any()
    kv.length = 8  # full: reserving a column trims, or fails when nothing is padding
    with pytest.raises(RuntimeError, match="should have finished"):
        kv.reserve_column()
    with pytest.raises(ValueError, match="max_rows=4"):
        kv.append(layer(3, 1, 0.0), torch.ones(3, 1), [1, 1, 1])


def test_graph_buckets():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(3) == [1, 2, 3] and row_buckets(1) == [1]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert [column_bucket(n, 2048) for n in (1, 256, 257, 1500, 2048)] == [256, 256, 512, 2048, 2048]
    assert column_bucket(100, 200) == 200


def test_static_option_errors(tiny_base):
    with pytest.raises(ValueError, match="kv_cache"):
        LocalEngine(tiny_base, LocalSettings(kv_cache="paged"))
    with pytest.raises(ValueError, match="max_model_len"):
        LocalEngine(tiny_base, LocalSettings(max_model_len=1))


def test_static_triton_metas_refill_in_place(tiny_base, handles, prompts, monkeypatch):
    """On the Triton backend (interpreted on CPU) the static decoder gives each row bucket one
    LoraBatchMeta whose tensors are refilled in place when the rows' slots change, the
    contract its CUDA graphs rely on, and the tokens stay those of the torch backend."""
    require_module("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    sampling = SamplingOptions(max_tokens=3, temperature=0.0)
    requests = [(f"r{i}", prompts[i], handles[n] if n else None)
                for i, n in enumerate(("math", "poetry", None))]
    options = dict(kv_cache="static", max_batch_size=2, max_loras=2)
    monkeypatch.setenv("LORAMIX_KERNELS", "torch")
    want = run_engine(tiny_base, _together(requests, sampling), **options)[0]
    monkeypatch.setenv("LORAMIX_KERNELS", "triton")
    metas = {}

    async def scenario(engine):
        got = await _together(requests, sampling)(engine)
        metas.update(engine._runner.decoder.metas)
        return got

    got = run_engine(tiny_base, scenario, **options)[0]
    assert got == want
    assert set(metas) <= {1, 2} and metas  # one meta per row bucket used
    for slot_ids, meta, loaded in metas.values():
        assert meta.slot_ids is slot_ids and list(loaded) == slot_ids.tolist()


def test_static_kv_bytes_matches_the_buffers(tiny_base, handles, prompts):
    """The size the engine checks against free GPU memory is what StaticKV allocates."""
    from server.engines.local.engine import static_kv_bytes

    async def scenario(engine):
        await collect(engine, "r", prompts[0], SamplingOptions(max_tokens=2, temperature=0.0))
        kv = engine._runner.kv
        model = engine._runner.model
        return (sum(t.numel() * t.element_size() for t in kv.keys + kv.values),
                static_kv_bytes(model.config, kv.max_rows, kv.max_len,
                                next(model.parameters()).element_size()))

    allocated, computed = run_engine(tiny_base, scenario, kv_cache="static", max_batch_size=3,
                                     max_model_len=100)
    assert allocated == computed > 0
