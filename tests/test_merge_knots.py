"""`knots` (KnOTS) and `core` (Core Space merging): against dense references written here,
the invariants of an aligned-space merge, and the factored-space promise (no d_out x d_in)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_factories import MODULE_SHAPES, merged_delta, random_adapter, rel, weighted_delta
from merging import InvalidMergeOptions, LoraAdapter, LoraModule, MergeFailedError, NonFiniteResultError, merge

ALIGNED = ["knots", "core"]
F64 = torch.float64


# ---------------------------------------------------------------- dense references


def _ties(tasks: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES written out: per-task top-`density` magnitudes, sign of the pruned sum (0 -> +),
    mean of the weighted values that agree with it."""
    pruned = []
    for t in tasks:
        keep = int(density * t.numel())
        threshold = t.abs().flatten().sort(descending=True).values[keep - 1]
        pruned.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    stacked = torch.stack(pruned)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = stacked.sign() == elected
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype)[:, None, None]
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def _rule(tasks, weights, rule, density):
    if rule == "ties":
        return _ties(tasks, weights, density)
    return sum(w * t for w, t in zip(weights, tasks))  # linear


def _deltas(adapters, module):
    return [a.modules[module].delta(F64) for a in adapters]


def knots_dense(adapters, weights, module, rule, density):
    """KnOTS by its definition: SVD of [ΔW_1 … ΔW_n], merge the rows Σ V_iᵀ, multiply by U."""
    deltas = _deltas(adapters, module)
    u, s, vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    k = int((s > s[0] * len(s) * 1e-12).sum())
    rows = (s[:k, None] * vh[:k]).split(deltas[0].shape[1], dim=1)
    return u[:, :k] @ _rule(list(rows), weights, rule, density)


def core_dense(adapters, weights, module, rule, density):
    """Core Space by its definition: U_B, V_A from SVDs of the stacked B and A, M_i = U_Bᵀ ΔW_i V_A."""
    mods = [a.modules[module] for a in adapters]
    u_b = torch.linalg.svd(torch.cat([m.scaling * m.lora_b.to(F64) for m in mods], 1), full_matrices=False)[0]
    v_a = torch.linalg.svd(torch.cat([m.lora_a.to(F64) for m in mods], 0), full_matrices=False)[2].T
    cores = [u_b.T @ d @ v_a for d in _deltas(adapters, module)]
    return u_b @ _rule(cores, weights, rule, density) @ v_a.T


REFERENCES = {"knots": knots_dense, "core": core_dense}


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize("rule, density", [("ties", 0.5), ("ties", 0.2), ("ties", 1.0), ("linear", 0.5)])
def test_matches_the_dense_reference(method, rule, density):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=3, scaling=2.0), random_adapter(3, rank=5)]
    weights = [0.5, -0.3, 0.8]
    result = merge(adapters, weights, method, options={"merge": rule, "density": density}, compute_dtype=F64)
    for module in MODULE_SHAPES:
        ref = REFERENCES[method](adapters, weights, module, rule, density)
        assert rel(merged_delta(result.adapter, module), ref) < 1e-8, module


@pytest.mark.parametrize("method", ALIGNED)
def test_float32_is_close_to_the_float64_reference(method):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    result = merge(adapters, [0.5, 0.5], method, options={"merge": "ties", "density": 1.0})
    for module in MODULE_SHAPES:
        ref = REFERENCES[method](adapters, [0.5, 0.5], module, "ties", 1.0)
        assert rel(merged_delta(result.adapter, module), ref) < 1e-5


def test_ties_in_the_aligned_space_is_not_ties_on_the_dense_delta():
    """Aligning first is the method: its result differs from TIES on ΔW (and from the exact sum)."""
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    aligned = merge(adapters, [0.5, 0.5], "knots", options={"density": 0.5}).adapter
    dense = merge(adapters, [0.5, 0.5], "ties", rank=8, options={"density": 0.5}).adapter
    module = "layers.1.down"
    assert rel(merged_delta(aligned, module), merged_delta(dense, module)) > 0.05
    assert rel(merged_delta(aligned, module), weighted_delta(adapters, [0.5, 0.5], module)) > 0.05


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize("rule", ["linear", "ties", "dare_ties"])
def test_one_adapter_comes_back_exactly(method, rule):
    adapter = random_adapter(4, rank=4, scaling=0.7)
    result = merge([adapter], [1.0], method, options={"merge": rule})
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), merged_delta(adapter, module)) < 1e-6


@pytest.mark.parametrize("method", ALIGNED)
def test_linear_rule_is_the_exact_weighted_sum(method):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=6, scaling=2.0), random_adapter(3, rank=2)]
    weights = [0.5, -0.3, 1.2]
    result = merge(adapters, weights, method, options={"merge": "linear"})
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), weighted_delta(adapters, weights, module)) < 1e-5
    assert result.info["relative_error"] < 1e-5


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize("rule", ["linear", "ties"])
def test_identical_adapters_average_back_to_themselves_at_their_rank(method, rule):
    adapter = random_adapter(5, rank=4)
    density = {"density": 1.0} if rule == "ties" else {}
    result = merge([adapter] * 3, [1.0] * 3 if rule == "ties" else None, method, options={"merge": rule, **density})
    assert result.adapter.max_rank == 4  # the repeated directions are dropped, not kept at ~0
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), merged_delta(adapter, module)) < 1e-5


@pytest.mark.parametrize("method", ALIGNED)
def test_output_rank_is_at_most_the_total_input_rank(method):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=3), random_adapter(3, rank=5)]
    result = merge(adapters, None, method)
    assert 1 <= result.adapter.max_rank <= 12
    for lora in result.adapter.modules.values():
        assert torch.linalg.matrix_rank(lora.delta(F64)) <= 12


@pytest.mark.parametrize("method", ALIGNED)
def test_same_sign_inputs_at_density_one_give_ties_weighting(method):
    """A twin 2·ΔW has the same aligned rows times 2: no sign conflict, so TIES' disjoint mean
    is the weighted sum over 2, exactly as `ties` on the dense ΔW gives."""
    adapter = random_adapter(3, rank=4)
    twin = LoraAdapter({n: LoraModule(m.lora_a, m.lora_b * 2, m.scaling) for n, m in adapter.modules.items()})
    weights = [0.25, 0.75]
    result = merge([adapter, twin], weights, method, options={"density": 1.0})
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), weighted_delta([adapter, twin], weights, module) / 2) < 1e-5


@pytest.mark.parametrize("method", ALIGNED)
def test_a_common_weight_scales_the_result(method):
    """The official code scales every task by one λ; equal weights λ here are that λ."""
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    one = merge(adapters, [1.0, 1.0], method).adapter
    scaled = merge(adapters, [0.4, 0.4], method).adapter
    for module in MODULE_SHAPES:
        assert rel(merged_delta(scaled, module), 0.4 * merged_delta(one, module)) < 1e-5


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize("rule", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_deterministic(method, rule):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    options = {"merge": rule, "seed": 7} if rule.startswith("dare") else {"merge": rule}
    runs = [merge(adapters, None, method, options=options).adapter for _ in range(2)]
    for module in MODULE_SHAPES:
        assert torch.equal(runs[0].modules[module].lora_a, runs[1].modules[module].lora_a)
        assert torch.equal(runs[0].modules[module].lora_b, runs[1].modules[module].lora_b)


@pytest.mark.parametrize("method", ALIGNED)
def test_dare_depends_on_the_seed_and_is_unbiased(method):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    module = "layers.1.down"
    runs = [merge(adapters, None, method, options={"merge": "dare_linear", "density": 0.3, "seed": s}).adapter
            for s in range(40)]
    assert rel(merged_delta(runs[0], module), merged_delta(runs[1], module)) > 0.1
    mean = sum(merged_delta(r, module) for r in runs) / len(runs)
    assert rel(mean, weighted_delta(adapters, [0.5, 0.5], module)) < 0.35  # E[DARE rows] = rows: exact sum


@pytest.mark.parametrize("method", ALIGNED)
def test_permuting_rank_units_changes_nothing(method):
    first, second = random_adapter(1, rank=6), random_adapter(2, rank=6)
    gen = torch.Generator().manual_seed(0)

    def permuted(adapter):
        modules = {}
        for name, m in adapter.modules.items():
            perm = torch.randperm(m.rank, generator=gen)
            modules[name] = LoraModule(m.lora_a[perm], m.lora_b[:, perm], m.scaling)
        return LoraAdapter(modules, adapter.base_model, adapter.dtype)

    a = merge([first, second], None, method, compute_dtype=F64).adapter
    b = merge([permuted(first), permuted(second)], None, method, compute_dtype=F64).adapter
    for module in MODULE_SHAPES:
        assert rel(merged_delta(b, module), merged_delta(a, module)) < 1e-9


@pytest.mark.parametrize("method", ALIGNED)
def test_half_precision_adapters_merge_and_keep_their_dtype(method):
    adapters = [random_adapter(1, rank=4, dtype=torch.bfloat16), random_adapter(2, rank=4, dtype=torch.bfloat16)]
    result = merge(adapters, None, method, options={"merge": "linear"})
    assert result.adapter.dtype == torch.bfloat16
    assert result.info["relative_error"] < 1e-5  # computed in float32 from the bf16 inputs


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize(
    "options, rank, param",
    [
        ({"merge": "mean"}, None, "merge"),
        ({"merge": 3}, None, "merge"),
        ({"density": 0.0}, None, "density"),
        ({"density": 2}, None, "density"),
        ({"majority_sign_method": "vote"}, None, "majority_sign_method"),
        ({"merge": "dare_ties", "seed": 2**32}, None, "seed"),
        ({"seed": 3}, None, "seed"),  # ties draws nothing at random
        ({"merge": "linear", "density": 0.3}, None, "density"),
        ({"merge": "dare_linear", "majority_sign_method": "frequency"}, None, "majority_sign_method"),
        ({"topk": 20}, None, "topk"),
        ({}, 4, "rank"),
    ],
)
def test_bad_options_raise_with_param(method, options, rank, param):
    with pytest.raises(InvalidMergeOptions) as caught:
        merge([random_adapter(1), random_adapter(2)], None, method, rank=rank, options=options)
    assert caught.value.param == param


@pytest.mark.parametrize("method", ALIGNED)
def test_options_at_their_default_are_accepted_with_any_rule(method):
    """The canonical form of a composition carries every option at its default; it must validate."""
    from merging import validate_options

    full = validate_options(method, {"merge": "linear"})
    assert full == {"merge": "linear", "density": 0.5, "majority_sign_method": "total", "seed": 0}
    assert validate_options(method, full) == full
    assert validate_options(method, {"merge": "dare_ties", "seed": 9, "density": 0.2})["seed"] == 9


@pytest.mark.parametrize("method", ALIGNED)
@pytest.mark.parametrize("rule", ["ties", "linear", "dare_ties"])
def test_weights_beyond_float32_are_an_error_not_a_wrong_adapter(method, rule):
    adapters = [random_adapter(1), random_adapter(2)]
    with pytest.raises((NonFiniteResultError, MergeFailedError)):
        merge(adapters, [1e300, 1e300], method, options={"merge": rule})


@pytest.mark.parametrize("method", ALIGNED)
def test_untrained_adapters_merge_to_zero_and_a_zero_adapter_drops_out_of_the_sum(method):
    zero, other = random_adapter(1), random_adapter(2)
    for module in zero.modules.values():
        module.lora_b.zero_()
    result = merge([zero, zero], None, method)
    assert all(not lora.lora_b.any() or not lora.lora_a.any() for lora in result.adapter.modules.values())
    result = merge([zero, other], [0.5, 0.5], method, options={"merge": "linear"})
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), 0.5 * merged_delta(other, module)) < 1e-5


# ---------------------------------------------------------------- factored space only

_HUGE = textwrap.dedent(
    """
    import json, resource, sys
    limit = 3 << 30  # 3 GiB of data; one dense 50_000 x 50_000 float32 matrix is 10 GB
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch
    from merging import LoraAdapter, LoraModule, merge
    side, rank = 50_000, 4
    try:
        torch.empty(side, side)
        refused = False
    except RuntimeError:
        refused = True
    gen = torch.Generator().manual_seed(0)
    adapters = [
        LoraAdapter({"proj": LoraModule(torch.randn(rank, side, generator=gen),
                                        torch.randn(side, rank, generator=gen), 0.5)}, "huge")
        for _ in range(2)
    ]
    out = {"refused": refused}
    for rule in ("linear", "ties"):
        info = merge(adapters, None, sys.argv[1], options={"merge": rule}).info
        out[rule] = {"rank": info["rank"], "relative_error": info["relative_error"], "seconds": info["seconds"]}
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("method", ALIGNED)
def test_a_50k_by_50k_module_merges_within_a_memory_limit_a_dense_delta_exceeds(method):
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _HUGE, method], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["refused"]  # the limit bites: ΔW itself could not even be allocated
    assert out["linear"]["rank"] <= 8 and out["linear"]["relative_error"] < 1e-4
    assert out["ties"]["rank"] <= 8 and 0 < out["ties"]["relative_error"] < 1
