"""The torch reference of kernels/ against a per-token float64 loop, plus meta and input checks."""

import pytest
import torch

import kernels
from kernels import reference


def _loop_add_lora(y, x, lora_a, lora_b, slot_ids, scaling, offset=0):
    """Per-token float64 ground truth of y[:, offset:offset+N] += s * B A x."""
    out = y.double().clone()
    for t, slot in enumerate(slot_ids.tolist()):
        if slot < 0:
            continue
        scale = float(scaling[slot]) if isinstance(scaling, torch.Tensor) else scaling
        delta = lora_b[slot].double() @ (lora_a[slot].double() @ x[t].double()) * scale
        out[t, offset:offset + delta.numel()] += delta
    return out


def _inputs(num_tokens, hidden_in, hidden_out, num_slots, rank, dtype, gen):
    x = torch.randn(num_tokens, hidden_in, generator=gen).to(dtype)
    lora_a = (torch.randn(num_slots, rank, hidden_in, generator=gen) / hidden_in ** 0.5).to(dtype)
    lora_b = torch.randn(num_slots, hidden_out, rank, generator=gen).to(dtype)
    y = torch.randn(num_tokens, hidden_out, generator=gen).to(dtype)
    slot_ids = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    return y, x, lora_a, lora_b, slot_ids


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("shape", [(1, 48, 96, 1, 1), (9, 96, 160, 3, 8), (33, 160, 48, 8, 16)])
@pytest.mark.parametrize("tensor_scale", [False, True])
def test_reference_matches_float64_loop(shape, dtype, tol, tensor_scale):
    gen = torch.Generator().manual_seed(hash((shape, str(dtype), tensor_scale)) % 2**31)
    y, x, lora_a, lora_b, slot_ids = _inputs(*shape, dtype, gen)
    scaling = torch.rand(shape[3], generator=gen) + 0.5 if tensor_scale else 0.7
    expected = _loop_add_lora(y, x, lora_a, lora_b, slot_ids, scaling)
    out = reference.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling)
    err = (out.double() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all() and err < tol
    idle = slot_ids < 0
    assert torch.equal(out[idle], y[idle])


def test_reference_slices_unequal_widths():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 64, generator=gen)
    slot_ids = torch.tensor([0, -1, 1, 1, 0, 2])
    lora_as = [torch.randn(3, 8, 64, generator=gen) for _ in range(3)]
    lora_bs = [torch.randn(3, n, 8, generator=gen) for n in (64, 16, 16)]
    y = torch.randn(6, 96, generator=gen)
    expected = y.double().clone()
    offset = 0
    for lora_a, lora_b in zip(lora_as, lora_bs):
        part = _loop_add_lora(torch.zeros(6, lora_b.shape[1]), x, lora_a, lora_b, slot_ids, 0.5)
        expected[:, offset:offset + lora_b.shape[1]] += part
        offset += lora_b.shape[1]
    out = kernels.add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, 0.5, backend="torch")
    assert torch.allclose(out.double(), expected, atol=1e-4)
    assert torch.equal(out[1], y[1])


def test_shrink_then_expand_equals_add_lora():
    gen = torch.Generator().manual_seed(2)
    y, x, lora_a, lora_b, slot_ids = _inputs(10, 48, 40, 4, 8, torch.float32, gen)
    buf = kernels.lora_shrink(x, lora_a, slot_ids, 2.0, backend="torch")
    assert buf.dtype == torch.float32 and buf.shape == (10, 8)
    assert torch.equal(buf[slot_ids < 0], torch.zeros_like(buf[slot_ids < 0]))
    wide = torch.cat([torch.zeros(10, 8), y], dim=1)
    kernels.lora_expand(wide, buf, lora_b, slot_ids, offset=8, backend="torch")
    direct = kernels.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, 2.0, backend="torch")
    assert torch.allclose(wide[:, 8:], direct, atol=1e-5)
    assert torch.equal(wide[:, :8], torch.zeros(10, 8))


def test_build_meta_groups_tokens():
    slot_ids = torch.tensor([2, -1, 0, 2, 2, -1, 0])
    meta = kernels.build_meta(slot_ids, 4)
    assert meta.slot_len.tolist() == [2, 0, 3, 0]
    assert meta.slot_start.tolist() == [0, 2, 2, 5]
    assert meta.sorted_tokens.tolist() == [2, 6, 0, 3, 4, 1, 5]
    tile_slot, tile_start = meta.tile_map(2)
    assert tile_slot.tolist()[:3] == [0, 2, 2] and set(tile_slot.tolist()[3:]) == {-1}
    assert tile_start.tolist()[:3] == [0, 2, 4]


def test_build_meta_refills_in_place():
    meta = kernels.build_meta(torch.tensor([0, 1, 1, -1]), 2)
    tensors = (meta.sorted_tokens, meta.tile_map(16)[0])
    same = kernels.build_meta(torch.tensor([-1, -1, 1, 0]), 2, out=meta)
    assert same is meta and meta.sorted_tokens is tensors[0] and meta.tile_map(16)[0] is tensors[1]
    assert meta.slot_len.tolist() == [1, 1] and meta.sorted_tokens.tolist()[:2] == [3, 2]
    with pytest.raises(ValueError, match="tokens"):
        kernels.build_meta(torch.tensor([0, 1]), 2, out=meta)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(slot_ids=torch.tensor([0, 5, 0])), ValueError, "slot"),
    (dict(slot_ids=torch.tensor([0.0, 1.0, 0.0])), TypeError, "integer"),
    (dict(slot_ids=torch.tensor([0, 1])), ValueError, "num_tokens"),
    (dict(lora_a=torch.randn(2, 4, 7)), ValueError, "hidden_in"),
    (dict(lora_b=torch.randn(2, 16, 5)), ValueError, "rank"),
    (dict(scaling=torch.ones(3)), ValueError, "num_slots"),
    (dict(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "float16"),
])
def test_input_errors_are_raised(bad, exc, match):
    args = dict(y=torch.zeros(3, 16), x=torch.randn(3, 8), lora_a=torch.randn(2, 4, 8),
                lora_b=torch.randn(2, 16, 4), slot_ids=torch.tensor([0, 1, -1]), scaling=1.0)
    args.update(bad)
    with pytest.raises(exc, match=match):
        kernels.add_lora(**args, backend="torch")


def test_backend_choice():
    x = torch.zeros(2, 2)
    assert kernels.backend_for(x) == "torch"
    with pytest.raises(ValueError, match="backend"):
        kernels.backend_for(x, "cuda")
