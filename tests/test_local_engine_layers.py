"""MultiLoraLinear and AdapterSlots on their own: per-token slots, slot -1, LRU and pinning."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():  # the Triton path runs under the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import merging
from kernels import add_lora
from server.engines.base import AdapterHandle, EngineError
from server.engines.local.lora_layers import LoraBatchContext, MultiLoraLinear
from server.engines.local.slots import AdapterSlots
from tests.optional_deps import require_module


def _layer(max_loras=3, max_lora_rank=8, engine_fused="auto"):
    torch.manual_seed(0)
    context = LoraBatchContext(engine_fused=engine_fused)
    return MultiLoraLinear(nn.Linear(16, 12, bias=False), context, max_loras, max_lora_rank)


def test_each_token_gets_its_slots_delta_and_slot_minus_one_is_bit_identical():
    layer = _layer()
    gen = torch.Generator().manual_seed(1)
    factors = {}
    for slot, rank in ((0, 4), (2, 8)):
        lora_a, lora_b = torch.randn(rank, 16, generator=gen), torch.randn(12, rank, generator=gen)
        layer.set_slot(slot, lora_a, lora_b, scaling=0.5)
        factors[slot] = 0.5 * lora_b @ lora_a
    x = torch.randn(2, 3, 16, generator=gen)  # rows use slots [2, -1]
    layer.context.set_slots([2, -1], 3, num_slots=3, device=torch.device("cpu"))
    with torch.inference_mode():
        y = layer(x)
        base = layer.base(x)
    assert torch.equal(y[1], base[1])
    torch.testing.assert_close(y[0], base[0] + x[0] @ factors[2].T)
    layer.context.set_slots([-1, -1], 3, num_slots=3, device=torch.device("cpu"))
    with torch.inference_mode():
        assert torch.equal(layer(x), base)
    # One slot for every token takes the two-matmul path; it agrees with the kernels' path.
    layer.context.set_slots([0, 0], 3, num_slots=3, device=torch.device("cpu"))
    assert layer.context.single_slot == 0
    with torch.inference_mode():
        single = layer(x)
        rows = base.reshape(6, 12).clone()
        add_lora(rows, x.reshape(6, 16), layer.lora_a, layer.lora_b,
                 torch.zeros(6, dtype=torch.int32))
    torch.testing.assert_close(single, rows.view(2, 3, 12), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(single, base + x @ factors[0].T)


@pytest.mark.parametrize("engine_fused", ["auto", "decode"])
def test_triton_path_plans_once_per_batch_and_matches_torch(monkeypatch, engine_fused):
    """On the Triton backend the layer calls add_lora_planned: the same result as the torch
    path, one plan per layer signature, and the batch's meta reused while the slots stay.
    engine_fused="decode" forces the one-launch fused kernel at decode sizes."""
    require_module("triton")
    # CPU tensors under the interpreter; on a GPU host the compiled kernels on CUDA tensors.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = _layer(engine_fused=engine_fused).to(device)
    gen = torch.Generator().manual_seed(2)
    delta = {}
    for slot, rank in ((0, 4), (2, 8)):
        lora_a, lora_b = torch.randn(rank, 16, generator=gen), torch.randn(12, rank, generator=gen)
        layer.set_slot(slot, lora_a.to(device), lora_b.to(device), scaling=0.5)
        delta[slot] = (0.5 * lora_b @ lora_a).T.to(device)
    x = torch.randn(3, 2, 16, generator=gen).to(device)
    context = layer.context
    with torch.inference_mode():
        base = layer.base(x)
        monkeypatch.setenv("LORAMIX_KERNELS", "torch")
        context.set_slots([2, -1, 0], 2, num_slots=3, device=device)
        want = layer(x)
        context.clear()
        monkeypatch.setenv("LORAMIX_KERNELS", "triton")
        outs, metas = [], []
        for row_slots in ([2, -1, 0], [2, -1, 0], [0, -1, 2]):
            context.set_slots(row_slots, 2, num_slots=3, device=device)
            outs.append(layer(x))
            metas.append(context.meta)
            context.clear()
    assert metas[0] is metas[1] and metas[2] is not metas[0] and len(metas[0].plans) == 1
    assert torch.equal(outs[0][1], base[1]) and torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[0], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2][0], base[0] + x[0] @ delta[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2][2], base[2] + x[2] @ delta[2], rtol=1e-5, atol=1e-5)


def _adapter(seed: int) -> merging.LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    module = merging.LoraModule(torch.randn(2, 16, generator=gen), torch.randn(12, 2, generator=gen))
    return merging.LoraAdapter({"proj": module})


def test_slots_evict_least_recently_used_but_never_a_pinned_adapter():
    layer = _layer(max_loras=2)
    slots = AdapterSlots({"proj": layer}, max_loras=2, max_lora_rank=8)
    handles = [AdapterHandle(i, f"a{i}", f"/nonexistent/a{i}", 2) for i in range(3)]
    for i, handle in enumerate(handles):
        slots.register(handle, _adapter(i))
    first, second = slots.acquire(handles[0]), slots.acquire(handles[1])
    assert {first, second} == {0, 1}
    assert slots.acquire(handles[2]) is None  # both pinned: wait
    slots.release(handles[0].adapter_id)
    slots.acquire(handles[1])  # a1 is now the most recently used
    slots.release(handles[1].adapter_id)
    assert slots.acquire(handles[2]) == first  # a0 was the unpinned LRU: evicted
    assert set(slots.resident()) == {"a1", "a2"}
    torch.testing.assert_close(layer.lora_a[first, :2], _adapter(2).modules["proj"].lora_a)
    assert not layer.lora_a[first, 2:].any()
    slots.release(handles[1].adapter_id)
    with pytest.raises(EngineError, match="'a0'") as caught:  # evicted a0 is re-read: gone
        slots.acquire(handles[0])
    assert "nonexistent" not in str(caught.value)
    assert set(slots.resident()) == {"a2"}  # a1 made room; the failed load gave the slot back
    slots.register(handles[0], _adapter(0))
    assert slots.acquire(handles[0]) == second
