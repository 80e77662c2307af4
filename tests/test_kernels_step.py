"""The per-step metadata of engines that capture CUDA graphs (kernels.step.StepMeta, prefix
metas) and the planned slices entry point (add_lora_slices_planned), on the Triton kernels
against their torch twin; under TRITON_INTERPRET=1 without CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from kernels.step import StepMeta  # noqa: E402
from tests.optional_deps import require_module  # noqa: E402
from tests.test_kernels import DEVICE, _check, _make  # noqa: E402

pytestmark = pytest.mark.triton
MAX_TOKENS, NUM_SLOTS = 48, 5


@pytest.fixture(autouse=True)
def _need_triton():
    require_module("triton")


@pytest.mark.parametrize("fused", [True, False, None], ids=["fused", "unfused", "host_rule"])
@pytest.mark.parametrize("widths", [(40,), (32, 16, 16), (24, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_slices_on_padded_prefix_match_reference(widths, dtype, fused):
    """A step of 13 tokens in buffers for 48, called on 20 rows (7 of padding, slot -1):
    the planned slices equal the twin on the step's slot ids, padding rows untouched."""
    seed = hash((widths, str(dtype), fused)) % 2**31
    y, x, lora_as, lora_bs, slot_ids, _ = _make(20, 48, list(widths), NUM_SLOTS, 8, dtype,
                                                "mixed", seed)
    step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    step.update(slot_ids[:13])
    padded = torch.cat([slot_ids[:13], torch.full((7,), -1, device=DEVICE)])
    y[padded < 0] = float("nan")
    expected = reference.add_lora_slices(y.clone(), x, lora_as, lora_bs, padded, 0.5)
    meta = step.for_tokens(20)
    out = kernels.add_lora_slices_planned(y.clone(), x, lora_as, lora_bs, meta, 0.5, fused=fused)
    _check(out, expected, y, padded, dtype)
    assert len(meta.plans) == 1 and step.for_tokens(20) is meta


def test_refill_reaches_every_prefix_and_plan():
    """Later steps refill the same tensors: a prefix meta and its plan made in an earlier
    step (as at CUDA-graph capture) give the new step's result, at the same addresses."""
    step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    y, x, lora_as, lora_bs, slot_ids, _ = _make(24, 48, [32, 16], NUM_SLOTS, 8, torch.float32,
                                                "mixed", 3)
    step.update(slot_ids)
    meta = step.for_tokens(24)
    kernels.add_lora_slices_planned(y.clone(), x, lora_as, lora_bs, meta)
    addresses = [meta.sorted_tokens.data_ptr(), *(t.data_ptr() for t in meta.tile_map(16))]
    for seed, pattern in ((4, "one_slot"), (5, "sparse"), (6, "all_idle")):
        _, _, _, _, new_ids, _ = _make(24, 48, [8], NUM_SLOTS, 8, torch.float32, pattern, seed)
        step.update(new_ids[:17])
        padded = torch.cat([new_ids[:17], torch.full((7,), -1, device=DEVICE)])
        y_step = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
        y_step[padded < 0] = float("nan")
        out = kernels.add_lora_slices_planned(y_step.clone(), x, lora_as, lora_bs,
                                              step.for_tokens(24))
        expected = reference.add_lora_slices(y_step.clone(), x, lora_as, lora_bs, padded)
        _check(out, expected, y_step, padded, torch.float32)
    assert addresses == [meta.sorted_tokens.data_ptr(), *(t.data_ptr() for t in meta.tile_map(16))]
    assert len(meta.plans) == 1


def test_step_meta_bounds():
    step = StepMeta(16, 2, DEVICE)
    step.update(torch.tensor([0, 1, -1, 0], device=DEVICE))
    assert step.for_tokens(3) is None  # fewer rows than the step's tokens
    assert step.for_tokens(17) is None  # more rows than the buffers
    assert step.for_tokens(4).num_tokens == 4
    with pytest.raises(ValueError, match="step has 17 tokens, buffers hold 16"):
        step.update(torch.zeros(17, dtype=torch.int32, device=DEVICE))


def test_planned_slices_check_their_inputs():
    y, x, lora_as, lora_bs, slot_ids, _ = _make(8, 48, [16, 16], NUM_SLOTS, 8, torch.float32,
                                                "mixed", 9)
    meta = kernels.build_meta(slot_ids, NUM_SLOTS)
    with pytest.raises(ValueError, match="slice widths"):
        kernels.add_lora_slices_planned(y[:, :24].contiguous(), x, lora_as, lora_bs, meta)
    with pytest.raises(TypeError, match="meta must be a LoraBatchMeta"):
        kernels.add_lora_slices_planned(y, x, lora_as, lora_bs, slot_ids)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.add_lora_slices_planned(y, x, [a.transpose(1, 2).contiguous().transpose(1, 2)
                                               for a in lora_as], lora_bs, meta)


def _meaningful(meta, step):
    """What the kernels read of a meta: ids, grouping, per tile its slot and (for used tiles)
    its start, and the record rows."""
    out = {name: getattr(meta, name).cpu().tolist()
           for name in ("slot_ids", "sorted_tokens", "slot_start", "slot_len", "slot_end")}
    for block_m, (tile_slot, tile_start) in meta.tiles.items():
        used = tile_slot >= 0
        out[("tiles", block_m)] = (tile_slot.cpu().tolist(), tile_start[used].cpu().tolist())
    for block_m, rec in meta.records.items():
        out[("records", block_m)] = rec.cpu().tolist()
    return out


@pytest.mark.parametrize("grouping", ["lists", "arrays"])
@pytest.mark.parametrize("seed", range(6))
def test_host_grouping_equals_build_meta_step_after_step(seed, grouping):
    """Slot ids given as host data are grouped on the host (one copy per step); over a run of
    steps that grow, shrink, empty and fill the buffers, what the kernels read equals
    build_meta's grouping of the same ids, and the addresses never move. Both host
    groupings: Python lists (decode-sized steps) and numpy (larger ones)."""
    gen = torch.Generator().manual_seed(seed)
    host_step, device_step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE), StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    host_step.list_max_tokens = MAX_TOKENS if grouping == "lists" else -1
    addresses = [t.data_ptr() for _, t in host_step._entries()]
    previous = None
    for n in (13, 48, 48, 0, 5, 5, 31, 1, 48, 2):
        ids = torch.randint(-1, NUM_SLOTS, (n,), generator=gen, dtype=torch.int32)
        if previous is not None and n == previous.numel() and n % 2 == 0:
            ids = previous.clone()  # a decode step of the same requests: nothing to send
        previous = ids
        if seed % 2:  # runs of one adapter, as requests lay tokens out
            ids = torch.sort(ids).values
        host_step.update(ids.tolist())
        device_step._update_on_device(ids.to(DEVICE))
        assert _meaningful(host_step.meta, host_step) == _meaningful(device_step.meta, device_step)
        assert host_step.num_tokens == device_step.num_tokens == n
    assert addresses == [t.data_ptr() for _, t in host_step._entries()]


@pytest.mark.parametrize("longest", [1, 15, 16, 17, 25, 32, 33, 40])
def test_host_grouping_of_a_dominant_slot(longest):
    """One slot with `longest` tokens beside a few of others: around each block size the
    tiles change from several per slot to one each (where the list grouping reuses the
    smaller block size's tiles), and what the kernels read still equals build_meta's."""
    gen = torch.Generator().manual_seed(longest)
    others = torch.randint(-1, NUM_SLOTS, (6,), generator=gen, dtype=torch.int32)
    others[others == 1] = 0
    ids = torch.cat([torch.full((longest,), 1, dtype=torch.int32), others])
    ids = ids[torch.randperm(ids.numel(), generator=gen)][:MAX_TOKENS]
    host_step, device_step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE), StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    host_step.list_max_tokens = MAX_TOKENS
    host_step.update(ids.tolist())
    device_step._update_on_device(ids.to(DEVICE))
    assert _meaningful(host_step.meta, host_step) == _meaningful(device_step.meta, device_step)


def test_host_steps_after_a_device_step_leave_nothing_stale():
    """A step grouped on the device (build_meta) between host steps: the next, shorter host
    step still equals build_meta's grouping (on CPU the buffer is its own host mirror)."""
    gen = torch.Generator().manual_seed(11)
    mixed, reference_step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE), StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    for n, on_device in ((9, False), (40, True), (6, False), (30, True), (0, False)):
        ids = torch.randint(-1, NUM_SLOTS, (n,), generator=gen, dtype=torch.int32)
        if on_device:
            mixed._update_on_device(ids.to(DEVICE))
        else:
            mixed.update(ids.numpy())
        reference_step._update_on_device(ids.to(DEVICE))
        assert _meaningful(mixed.meta, mixed) == _meaningful(reference_step.meta, reference_step)


def test_a_block_size_made_after_packing_is_refilled_too():
    """A plan that asks for a block size the buffer was not packed with gets its own tensors
    (LoraBatchMeta.tile_map): later steps refill those as well (through build_meta)."""
    gen = torch.Generator().manual_seed(12)
    step, reference_step = StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE), StepMeta(MAX_TOKENS, NUM_SLOTS, DEVICE)
    step.update([0, 1, 1, -1])
    step.meta.tile_map(8), step.meta.tile_records(8)
    reference_step.meta.tile_map(8), reference_step.meta.tile_records(8)
    for n in (20, 7):
        ids = torch.randint(-1, NUM_SLOTS, (n,), generator=gen, dtype=torch.int32)
        step.update(ids.tolist())
        reference_step._update_on_device(ids.to(DEVICE))
        assert _meaningful(step.meta, step) == _meaningful(reference_step.meta, reference_step)


def test_host_grouping_rejects_out_of_range_slots():
    step = StepMeta(8, 2, DEVICE)
    with pytest.raises(ValueError, match=r"slot ids must lie in \[-1, 2\)"):
        step.update([0, 2])
    with pytest.raises(ValueError, match="step has 9 tokens, buffers hold 8"):
        step.update([0] * 9)
