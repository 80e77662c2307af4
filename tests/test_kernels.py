"""Triton multi-LoRA kernels against the torch reference over a shape grid.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set here) on small
shapes. Without triton these tests skip, or FAIL when LORAMIX_REQUIRE_ALL=1.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
# bf16 under the interpreter rounds by truncation (1 ulp = 2^-7); fp32 dots on GPU use tf32.
TOL = {torch.float32: 1e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 2e-3,
       torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _need_triton():
    if HAS_TRITON:
        return
    if os.environ.get("LORAMIX_REQUIRE_ALL") == "1":
        pytest.fail("triton is not installed but LORAMIX_REQUIRE_ALL=1")
    pytest.skip("triton is not installed")


def _triton():
    from kernels import triton_ops
    return triton_ops


def _slot_ids(num_tokens, num_slots, pattern, gen):
    if pattern == "all_idle":
        return torch.full((num_tokens,), -1)
    if pattern == "one_slot":
        return torch.full((num_tokens,), num_slots - 1)
    if pattern == "sparse":  # only even slots used: odd slots stay empty
        ids = torch.randint(0, (num_slots + 1) // 2, (num_tokens,), generator=gen) * 2
        return torch.where(torch.rand(num_tokens, generator=gen) < 0.2, -1, ids)
    return torch.randint(-1, num_slots, (num_tokens,), generator=gen)


def _make(num_tokens, hidden_in, widths, num_slots, rank, dtype, pattern, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    x = rnd(num_tokens, hidden_in).to(DEVICE, dtype)
    lora_as = [(rnd(num_slots, rank, hidden_in) / hidden_in ** 0.5).to(DEVICE, dtype)
               for _ in widths]
    lora_bs = [rnd(num_slots, n, rank).to(DEVICE, dtype) for n in widths]
    y = rnd(num_tokens, sum(widths)).to(DEVICE, dtype)
    slot_ids = _slot_ids(num_tokens, num_slots, pattern, gen).to(DEVICE)
    y[slot_ids < 0] = float("nan")  # rows without adapter must come back bit-identical
    scaling = (torch.rand(num_slots, generator=gen) + 0.5).to(DEVICE) if seed % 2 else 0.75
    return y, x, lora_as, lora_bs, slot_ids, scaling


def _check(out, expected, y_before, slot_ids, dtype):
    idle = slot_ids < 0
    assert torch.equal(out[idle].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       y_before[idle].view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert torch.isfinite(out[~idle]).all(), "NaN/inf in rows with an adapter"
    if (~idle).any():
        ref = expected[~idle].double()
        err = (out[~idle].double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err < TOL[dtype], f"relative error {err:.2e}"


# (num_tokens, hidden_in, hidden_out, num_slots, rank)
SHAPES = [(1, 48, 96, 1, 1), (5, 96, 160, 8, 16), (16, 160, 48, 4, 8), (37, 96, 96, 8, 16),
          (80, 48, 160, 3, 8), (7, 64, 32, 2, 64), (3, 32, 48, 2, 128)]
PATTERNS = ["mixed", "sparse", "one_slot", "all_idle"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = [(s, p, d) for s in SHAPES for p in PATTERNS for d in DTYPES
         if p == "mixed" or d == torch.float32]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape,pattern,dtype", CASES)
def test_add_lora_matches_reference(shape, pattern, dtype, fused):
    num_tokens, hidden_in, hidden_out, num_slots, rank = shape
    seed = hash((shape, pattern, str(dtype), fused)) % 2**31
    y, x, (lora_a,), (lora_b,), slot_ids, scaling = _make(
        num_tokens, hidden_in, [hidden_out], num_slots, rank, dtype, pattern, seed)
    expected = reference.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling)
    out = _triton().add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling, fused=fused)
    _check(out, expected, y, slot_ids, dtype)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("widths", [(64, 16, 16), (96, 48), (32, 32, 32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_lora_slices_matches_reference(widths, dtype, fused):
    seed = hash((widths, str(dtype), fused)) % 2**31
    y, x, lora_as, lora_bs, slot_ids, scaling = _make(20, 48, list(widths), 5, 8, dtype,
                                                      "mixed", seed)
    meta = kernels.build_meta(slot_ids, 5)
    expected = reference.add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling)
    out = _triton().add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling,
                                    meta=meta, fused=fused)
    _check(out, expected, y, slot_ids, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_and_expand_match_reference(dtype):
    y, x, (lora_a,), (lora_b,), slot_ids, scaling = _make(24, 96, [48], 6, 16, dtype,
                                                          "mixed", 11)
    buf = _triton().lora_shrink(x, lora_a, slot_ids, scaling)
    ref_buf = reference.lora_shrink(x, lora_a, slot_ids, scaling)
    assert buf.dtype == torch.float32 and buf.shape == ref_buf.shape
    assert torch.isfinite(buf).all() and torch.equal(buf[slot_ids < 0], ref_buf[slot_ids < 0])
    assert (buf - ref_buf).norm() / ref_buf.norm() < TOL[dtype]
    wide = torch.cat([y, y], dim=1)
    expected = reference.lora_expand(wide.clone(), ref_buf, lora_b, slot_ids, offset=48)
    out = _triton().lora_expand(wide.clone(), buf, lora_b, slot_ids, offset=48)
    _check(out, expected, wide, slot_ids, dtype)


def test_split_k_workspace_fully_written():
    """Every split's partial of every active token is written: a NaN-poisoned ws stays clean."""
    triton_ops = _triton()
    y, x, (lora_a,), (lora_b,), slot_ids, scaling = _make(40, 160, [48], 4, 8, torch.float32,
                                                          "mixed", 5)
    meta = kernels.build_meta(slot_ids, 4)
    ws = torch.full((3, 40, 8), float("nan"), device=DEVICE)
    ws_out = triton_ops._shrink(x, [lora_a], scaling, meta, ws=ws)
    active = slot_ids >= 0
    assert ws_out.shape[0] > 1 and torch.isfinite(ws_out[:, active]).all()
    ref_buf = reference.lora_shrink(x, lora_a, slot_ids, scaling)
    assert torch.allclose(ws_out[:, active].sum(0), ref_buf[active], atol=1e-4)


def test_dispatch_uses_triton_when_forced(monkeypatch):
    monkeypatch.setenv("LORAMIX_KERNELS", "triton")
    y, x, (lora_a,), (lora_b,), slot_ids, scaling = _make(4, 32, [32], 2, 8, torch.float32,
                                                          "mixed", 3)
    assert kernels.backend_for(x) == "triton"
    expected = reference.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling)
    out = kernels.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling)
    _check(out, expected, y, slot_ids, torch.float32)


def test_triton_rejects_bad_inputs():
    triton_ops = _triton()
    y, x, (lora_a,), (lora_b,), slot_ids, _ = _make(4, 32, [32], 2, 8, torch.float32, "mixed", 4)
    with pytest.raises(TypeError, match="dtype"):
        triton_ops.add_lora(y, x, lora_a.half(), lora_b, slot_ids)
    with pytest.raises(ValueError, match="width"):
        triton_ops.add_lora(y[:, :16], x, lora_a, lora_b, slot_ids)
    with pytest.raises(ValueError, match="unit stride"):
        triton_ops.add_lora(y.t().contiguous().t(), x, lora_a, lora_b, slot_ids)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("split,hidden_in,widths", [(3, 96, (160,)), (5, 48, (40, 24, 8)),
                                                   (7, 64, (96,))])
def test_split_k_and_n_chunks(monkeypatch, fused, split, hidden_in, widths):
    """Forced small blocks: several K parts (some empty), several N blocks per part."""
    from kernels import launch
    cfg = launch.Launch(block_m=16, block_k=16, block_n=16, split_k=split)
    for name in ("fused_launch", "shrink_launch", "expand_launch"):
        monkeypatch.setattr(launch, name, lambda *_, c=cfg: c)
    y, x, lora_as, lora_bs, slot_ids, scaling = _make(21, hidden_in, list(widths), 4, 8,
                                                      torch.float32, "mixed", split)
    expected = reference.add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling)
    out = _triton().add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling,
                                    fused=fused)
    _check(out, expected, y, slot_ids, torch.float32)
