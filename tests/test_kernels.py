"""Triton multi-LoRA kernels against the torch reference over a shape grid.

On a machine without CUDA the kernels run under TRITON_INTERPRET=1 (set here) on small
shapes. Without triton these tests skip, or FAIL when LORAMIX_REQUIRE_ALL=1.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402
from kernels import reference  # noqa: E402
from tests.optional_deps import require_module  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 under the interpreter rounds by truncation (1 ulp = 2^-7); fp32 dots on GPU use tf32.
TOL = {torch.float32: 1e-3 if DEVICE == "cuda" else 1e-5, torch.float16: 2e-3,
       torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _need_triton():
    require_module("triton")


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
    step = triton_ops._shrink_step(x, [lora_a], isinstance(scaling, torch.Tensor), meta, ws=ws)
    scale_ptr, scale_val, _ = triton_ops._scale_args(scaling, x)
    step.launch(x, None, [lora_a] * 3, None, scale_ptr, scale_val)
    ws_out = step.buffers[0]
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


@pytest.mark.parametrize("variant", ["plain", "rec+pdl"])
@pytest.mark.parametrize("rank,block_r,split,pattern", [(48, 16, 3, "mixed"), (40, 32, 2, "mixed"),
                                                        (64, 16, 4, "one_slot"), (16, 32, 2, "mixed")])
def test_shrink_rank_blocks(monkeypatch, rank, block_r, split, pattern, variant):
    """The shrink split over rank columns too (Launch.block_r): each of a tile's K chunks in
    cdiv(rank, block_r) programs; a block_r at or above the rank is the one-block shrink."""
    from kernels import launch
    cfg = launch.Launch(block_m=16, block_k=16, block_n=16, split_k=split, block_r=block_r)
    _check_forced_launch(monkeypatch, cfg, (21, 80, [40, 24], 4, rank, torch.float32, pattern,
                                            rank + split), fused=False, variant=variant)


def test_shrink_block_r_rule():
    from kernels import launch
    assert launch.shrink_block_r(launch.Launch(), 64) == 64
    assert launch.shrink_block_r(launch.Launch(block_r=16), 64) == 16
    assert launch.shrink_block_r(launch.Launch(block_r=128), 48) == 64
    with pytest.raises(ValueError, match="power of two"):
        launch.shrink_block_r(launch.Launch(block_r=24), 64)


def test_fused_when_first_match_decides(tmp_path, monkeypatch):
    from kernels import launch
    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    rules = [{"max_tokens": 16, "min_rank": 32, "fused": False}, {"max_tokens": 64}]
    (tmp_path / "t.json").write_text(json.dumps({"fused_when": rules}))
    launch.use_fused.cache_clear()
    launch.tuned_table.cache_clear()
    try:
        assert [launch.use_fused("t", tokens, 8, rank, 4096) for tokens, rank in
                ((8, 64), (8, 16), (32, 64), (128, 16))] == [False, True, True, False]
    finally:
        launch.use_fused.cache_clear()
        launch.tuned_table.cache_clear()


def test_sum_unroll_rule():
    from kernels import launch
    assert [launch.sum_unroll(launch.Launch(), k) for k in (1, 2, 3, 5, 8, 32)] == [1, 2, 4, 8, 8, 8]
    assert launch.sum_unroll(launch.Launch(unroll=1), 16) == 1
    with pytest.raises(ValueError, match="unroll"):
        launch.sum_unroll(launch.Launch(unroll=0), 4)


def _bits(t):
    return t.view(torch.int16 if t.dtype != torch.float32 else torch.int32)


@pytest.mark.parametrize("num_tokens", [8, 80], ids=["fused", "pair"])  # CPU rule: fused <= 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planned_is_bitwise_add_lora_over_layers(num_tokens, dtype):
    """add_lora_planned = triton add_lora with the same meta, bit for bit, over two layers of one
    signature (one plan, one workspace, different weights) and a column-major x."""
    gen = torch.Generator().manual_seed(num_tokens)
    layers = [_make(num_tokens, 96, [160], 4, 16, dtype, "mixed", 2 * i)[1:4] for i in range(2)]
    slot_ids = _slot_ids(num_tokens, 4, "mixed", gen).to(DEVICE)
    meta = kernels.build_meta(slot_ids, 4)
    y0 = torch.randn(num_tokens, 160, generator=gen).to(DEVICE, dtype)
    want, got = y0.clone(), y0.clone()
    col_major_x = layers[0][0].t().contiguous().t()
    for x, (lora_a,), (lora_b,) in layers + [(col_major_x, *layers[1][1:])]:
        _triton().add_lora(want, x, lora_a, lora_b, slot_ids, meta=meta)
        kernels.add_lora_planned(got, x, lora_a, lora_b, meta)
    assert torch.equal(_bits(got), _bits(want))
    assert len(meta.plans) == 2  # row-major x and column-major x


def test_planned_plans_survive_refill():
    """A meta refilled in place for the next batch keeps its plans, which see the new slots."""
    y, x, (lora_a,), (lora_b,), slot_ids, _ = _make(24, 64, [48], 4, 8, torch.float32, "mixed", 6)
    meta = kernels.build_meta(slot_ids, 4)
    kernels.add_lora_planned(y.clone(), x, lora_a, lora_b, meta)
    new_ids = slot_ids.flip(0)
    kernels.build_meta(new_ids, 4, out=meta)
    got = kernels.add_lora_planned(y.clone(), x, lora_a, lora_b, meta)
    want = _triton().add_lora(y.clone(), x, lora_a, lora_b, new_ids,
                              meta=kernels.build_meta(new_ids, 4))
    assert len(meta.plans) == 1 and torch.equal(_bits(got), _bits(want))


def test_planned_checks_like_add_lora():
    y, x, (lora_a,), (lora_b,), slot_ids, _ = _make(4, 32, [32], 2, 8, torch.float32, "mixed", 4)
    meta = kernels.build_meta(slot_ids, 2)
    with pytest.raises(TypeError, match="dtype"):
        kernels.add_lora_planned(y, x, lora_a.half(), lora_b, meta)
    with pytest.raises(ValueError, match="width"):
        kernels.add_lora_planned(y[:, :16], x, lora_a, lora_b, meta)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.add_lora_planned(y.t().contiguous().t(), x, lora_a, lora_b, meta)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.add_lora_planned(y, x, lora_a.transpose(1, 2).contiguous().transpose(1, 2),
                                 lora_b, meta)
    with pytest.raises(ValueError, match="expected 3 .num_tokens."):
        kernels.add_lora_planned(y[:3], x[:3], lora_a, lora_b, meta)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        kernels.add_lora_planned(y, None, lora_a, lora_b, meta)
    assert not meta.plans


VARIANT_COMBOS = [(False, "rec"), (False, "pdl"), (False, "rec+pdl"), (True, "rec")]


@pytest.mark.parametrize("fused,variant", VARIANT_COMBOS,
                         ids=[f"{'fused' if f else 'unfused'}-{v}" for f, v in VARIANT_COMBOS])
@pytest.mark.parametrize("shape,pattern,dtype",
                         [(s, "mixed", torch.bfloat16) for s in SHAPES]
                         + [(s, "sparse", torch.float32) for s in SHAPES[:4]]
                         + [(SHAPES[1], "all_idle", torch.float32)])
def test_variants_match_reference(shape, pattern, dtype, fused, variant):
    """Kernel variants (one-record tiles, PDL ordering of the expand) compute the same."""
    num_tokens, hidden_in, hidden_out, num_slots, rank = shape
    seed = hash((shape, pattern, str(dtype), fused, variant)) % 2**31
    y, x, (lora_a,), (lora_b,), slot_ids, scaling = _make(
        num_tokens, hidden_in, [hidden_out], num_slots, rank, dtype, pattern, seed)
    expected = reference.add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling)
    out = _triton().add_lora(y.clone(), x, lora_a, lora_b, slot_ids, scaling, fused=fused,
                             variant=variant)
    _check(out, expected, y, slot_ids, dtype)


@pytest.mark.parametrize("fused,variant", VARIANT_COMBOS + [(False, "plain@NVIDIA_H200_candidate"),
                                                            (True, "plain@NVIDIA_H200_candidate")])
def test_variant_slices_and_split_chunks(monkeypatch, fused, variant):
    """Unequal slices (programs past a narrow slice's end) and several K/N chunks per tile."""
    from kernels import launch
    cfg = launch.Launch(block_m=16, block_k=16, block_n=16, split_k=5)
    _check_forced_launch(monkeypatch, cfg, (21, 48, [40, 24, 8], 4, 8, torch.float32, "mixed", 9),
                         fused=fused, variant=variant)


@pytest.mark.parametrize("fused,variant", VARIANT_COMBOS)
@pytest.mark.parametrize("unroll,split,b_first", [(4, 5, 1), (2, 2, 0), (8, 3, 0), (1, 3, 1)])
def test_partials_summed_unrolled(monkeypatch, fused, variant, unroll, split, b_first):
    """Launch.unroll: the expand (or the fused kernel's expand half) loads `unroll` split-K
    partials per step; a split count that is not a multiple of it masks the missing ones.
    Launch.b_first: the expand loads B and y before or after the partials."""
    from kernels import launch
    cfg = launch.Launch(block_m=16, block_k=16, block_n=16, split_k=split, unroll=unroll,
                        b_first=b_first)
    _check_forced_launch(monkeypatch, cfg, (21, 80, [40, 24], 4, 16, torch.float32, "mixed",
                                            unroll + split), fused=fused, variant=variant)


def _check_forced_launch(monkeypatch, cfg, make_args, fused, variant):
    """add_lora_slices with every launch config forced to cfg, against the torch twin."""
    from kernels import launch
    for name in ("fused_launch", "shrink_launch", "expand_launch"):
        monkeypatch.setattr(launch, name, lambda *_, c=cfg: c)
    y, x, lora_as, lora_bs, slot_ids, scaling = _make(*make_args)
    meta = kernels.build_meta(slot_ids, make_args[3])
    expected = reference.add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling)
    out = _triton().add_lora_slices(y.clone(), x, lora_as, lora_bs, slot_ids, scaling,
                                    meta=meta, fused=fused, variant=variant)
    _check(out, expected, y, slot_ids, torch.float32)


def test_tile_records_match_tile_map():
    """A record row holds the tile's tokens (sorted_tokens[start:end], -1 after) and slot."""
    slot_ids = torch.tensor([2, -1, 0, 2, 2, -1, 0] * 5)
    meta = kernels.build_meta(slot_ids, 4)
    for block_m in (16, 32):
        tile_slot, tile_start = meta.tile_map(block_m)
        rec = meta.tile_records(block_m)
        assert rec.shape == (tile_slot.numel(), block_m + 4)
        assert torch.equal(rec[:, block_m], tile_slot)
        for t, slot in enumerate(tile_slot.tolist()):
            want = []
            if slot >= 0:
                start = int(tile_start[t])
                want = meta.sorted_tokens[start:min(start + block_m,
                                                    int(meta.slot_end[slot]))].tolist()
            assert rec[t, :block_m].tolist() == want + [-1] * (block_m - len(want))
    refill = kernels.build_meta(torch.tensor([1, 1, 3, -1, 0, 0, 0] * 5), 4)
    kernels.build_meta(torch.tensor([1, 1, 3, -1, 0, 0, 0] * 5), 4, out=meta)
    assert torch.equal(meta.tile_records(16), refill.tile_records(16))


def test_variant_names_and_host_rule():
    from kernels import launch
    assert launch.Variant.parse("rec+pdl") == launch.Variant(records=True, pdl=True)
    assert launch.Variant.parse("plain@NVIDIA_H200_candidate").table == "NVIDIA_H200_candidate"
    with pytest.raises(ValueError, match="unknown kernel variant"):
        launch.Variant.parse("fast")
    with pytest.raises(ValueError, match="no config table"):
        launch.Variant.parse("rec@nope")
    # The H200 table turns tile records on (measured faster at every token count, run 4);
    # a GPU without a table gets the plain kernels.
    assert launch.pick_variant("NVIDIA H200", 1, 1, 16, 4096) == launch.Variant(records=True)
    assert launch.pick_variant("Some Other GPU", 1, 1, 16, 4096) == launch.Variant()


_HOPPER_COMPILE = r"""
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_kernels as tk

def ptx(kernel, constexprs, num_stages):
    sig = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*fp32" if name.startswith(("ws", "scale")) else
                         "*i32" if name.startswith(("sorted", "tile", "slot", "count")) else
                         "*bf16")
        else:
            sig[name] = "fp32" if name == "scale_val" else "i32"
    compiled = triton.compile(ASTSource(kernel, sig, constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=4, num_stages=num_stages))
    return compiled.asm["ptx"]

out = {}
for records in (False, True):
    for pdl in (False, True):
        common = dict(BLOCK_M=16, BLOCK_R=16, DOT_UPCAST=False, RECORDS=records)
        shrink = ptx(tk.shrink_kernel, dict(common, HAS_SCALE_TENSOR=True, BLOCK_K=128,
                                            GDC=pdl), 3)
        expand = ptx(tk.expand_kernel, dict(common, BLOCK_N=128, PDL=pdl, GDC=pdl,
                                            UNROLL=4 if records else 1, B_FIRST=records), 2)
        out[f"{records}-{pdl}"] = ["griddepcontrol.launch_dependents" in shrink,
                                   "griddepcontrol.wait" in expand]
    ptx(tk.fused_kernel, dict(common, HAS_SCALE_TENSOR=False, BLOCK_K=128, BLOCK_N=128,
                              PHASE=0, UNROLL=8), 2)
print(json.dumps(out))
"""


def test_variants_compile_for_hopper():
    """The interpreter cannot run griddepcontrol: compile every variant for sm_90 (triton's
    bundled ptxas, no GPU needed) in a process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _HOPPER_COMPILE], capture_output=True,
                          text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, (launches, waits) in flags.items():
        pdl = key.endswith("True")
        assert launches == pdl and waits == pdl, (key, launches, waits)
