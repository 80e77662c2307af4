"""Invariants every merge method must keep (exactness, weights, permutations, determinism)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_factories import MODULE_SHAPES, merged_delta, random_adapter, rel, weighted_delta
from merging import METHODS, InvalidMergeOptions, LoraAdapter, LoraModule, NonFiniteResultError, merge

ALL_METHODS = sorted(METHODS)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_single_adapter_at_weight_one_comes_back_unchanged(method):
    adapter = random_adapter(1, rank=4)
    result = merge([adapter], [1.0], method)
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), weighted_delta([adapter], [1.0], module)) < 1e-5
    assert result.info["relative_error"] < 1e-5


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("w", [0.7, -0.4])
def test_weights_w_and_zero_give_w_times_the_first(method, w):
    first, second = random_adapter(1, rank=4), random_adapter(2, rank=4)
    result = merge([first, second], [w, 0.0], method)
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), w * merged_delta(first, module)) < 1e-5


def test_cat_equals_applying_the_adapters_separately():
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=8, scaling=2.0), random_adapter(3, rank=2)]
    weights = [0.5, -0.3, 1.2]
    result = merge(adapters, weights, "cat")
    assert result.adapter.max_rank == 14
    x = torch.randn(5, 16, dtype=torch.float64)
    for module in ("layers.0.q", "layers.1.q"):
        separately = sum(w * x @ a.modules[module].delta(torch.float64).T for a, w in zip(adapters, weights))
        assert rel(x @ merged_delta(result.adapter, module).T, separately) < 1e-6
    assert result.info["relative_error"] == 0.0


def test_default_weights_are_equal_and_sum_to_one():
    adapters = [random_adapter(s) for s in (1, 2, 3, 4)]
    result = merge(adapters, method="cat")
    assert result.info["weights"] == [0.25] * 4
    module = "layers.0.v"
    assert rel(merged_delta(result.adapter, module), weighted_delta(adapters, [0.25] * 4, module)) < 1e-6


def test_modules_missing_from_some_adapters_are_merged_as_zero():
    only_q = random_adapter(5, modules=["layers.0.q"])
    full = random_adapter(6)
    result = merge([only_q, full], [0.5, 0.5], "cat")
    assert set(result.adapter.modules) == set(MODULE_SHAPES)
    for module in MODULE_SHAPES:
        ref = weighted_delta([only_q, full], [0.5, 0.5], module)
        assert rel(merged_delta(result.adapter, module), ref) < 1e-6


def _permute_units(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, m in adapter.modules.items():
        perm = torch.randperm(m.rank, generator=gen)
        modules[name] = LoraModule(m.lora_a[perm], m.lora_b[:, perm], m.scaling)
    return LoraAdapter(modules, adapter.base_model, adapter.dtype)


@pytest.mark.parametrize("method", ["cat", "svd", "lego", "ties", "dare_ties", "magnitude_prune"])
def test_permuting_rank_units_changes_nothing(method):
    first, second = random_adapter(1, rank=6), random_adapter(2, rank=6)
    a = merge([first, second], [0.5, 0.5], method, options={"seed": 3} if method == "lego" else None)
    b = merge([_permute_units(first, 7), _permute_units(second, 8)], [0.5, 0.5], method,
              options={"seed": 3} if method == "lego" else None)
    for module in MODULE_SHAPES:
        assert rel(merged_delta(b.adapter, module), merged_delta(a.adapter, module)) < 1e-5


def test_linear_depends_on_unit_order_because_of_cross_terms():
    """Factor averaging pairs unit i of one adapter with unit i of another (B_i A_j terms)."""
    first, second = random_adapter(1, rank=6), random_adapter(2, rank=6)
    a = merge([first, second], [0.5, 0.5], "linear")
    b = merge([_permute_units(first, 7), second], [0.5, 0.5], "linear")
    assert rel(merged_delta(b.adapter, "layers.0.q"), merged_delta(a.adapter, "layers.0.q")) > 0.1
    assert a.info["relative_error"] > 0.1


def test_lego_with_k_equal_to_all_units_reproduces_cat():
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=6, scaling=1.5)]
    weights = [0.6, -0.4]
    cat = merge(adapters, weights, "cat")
    for reweight in ("none", "l2", "maxabs"):
        lego = merge(adapters, weights, "lego", rank=10, options={"param_reweight": reweight})
        for module in MODULE_SHAPES:
            assert rel(merged_delta(lego.adapter, module), merged_delta(cat.adapter, module)) < 1e-5
        assert lego.info["relative_error"] < 1e-5


def test_lego_is_deterministic_for_a_seed_and_uses_it():
    adapters = [random_adapter(s, rank=8) for s in (1, 2, 3)]
    runs = [merge(adapters, None, "lego", rank=5, options={"seed": seed}) for seed in (11, 11, 12)]
    module = "layers.1.down"
    assert torch.equal(runs[0].adapter.modules[module].lora_a, runs[1].adapter.modules[module].lora_a)
    assert rel(merged_delta(runs[2].adapter, module), merged_delta(runs[0].adapter, module)) > 1e-6


def test_lego_merges_identical_adapters_exactly():
    """Duplicated units fall into the same cluster; with weights summing to 1 the result is the adapter."""
    adapter = random_adapter(4, rank=6)
    result = merge([adapter, adapter, adapter], None, "lego", rank=6)
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), merged_delta(adapter, module)) < 1e-5


def test_lego_output_reweighting_scales_by_sqrt_r_over_k():
    adapter = random_adapter(4, rank=4)
    plain = merge([adapter, adapter], None, "lego", rank=4)
    scaled = merge([adapter, adapter], None, "lego", rank=4, options={"output_reweight": "sqrt"})
    assert rel(merged_delta(scaled.adapter, "layers.0.q"), merged_delta(plain.adapter, "layers.0.q")) < 1e-6
    wide = merge([adapter, adapter], None, "lego", rank=16, options={"output_reweight": "sqrt"})
    assert rel(merged_delta(wide.adapter, "layers.0.q"), 0.5 * merged_delta(adapter, "layers.0.q")) < 1e-5


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_density_one_without_sign_conflicts_is_the_weighted_sum(method):
    """At density 1 nothing is pruned; with same-sign inputs TIES keeps every entry."""
    adapter = random_adapter(3, rank=4)
    twin = LoraAdapter({n: LoraModule(m.lora_a, m.lora_b * 2, m.scaling) for n, m in adapter.modules.items()})
    weights = [0.25, 0.75]
    result = merge([adapter, twin], weights, method, rank=16, options={"density": 1.0})
    mean_like = "ties" in method
    for module in MODULE_SHAPES:
        ref = weighted_delta([adapter, twin], weights, module) / (2 if mean_like else 1)
        assert rel(merged_delta(result.adapter, module), ref) < 1e-5


def test_dare_rescales_survivors_by_one_over_density():
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=4)]
    module = "layers.1.down"
    ref = weighted_delta(adapters, [0.5, 0.5], module)
    runs = [merge(adapters, None, "dare_linear", rank=16, options={"density": 0.3, "seed": s}) for s in range(40)]
    mean = sum(merged_delta(r.adapter, module) for r in runs) / len(runs)
    assert rel(mean, ref) < 0.35  # unbiased: the mean converges to the sum (no 1/density → ~0.7)
    assert rel(merged_delta(runs[0].adapter, module), merged_delta(runs[1].adapter, module)) > 0.1


def test_svd_is_exact_when_rank_covers_the_sum():
    adapters = [random_adapter(1, rank=3), random_adapter(2, rank=3)]
    result = merge(adapters, [0.5, 0.5], "svd", rank=6)
    assert result.info["relative_error"] < 1e-6


def test_reported_relative_error_matches_dense_computation():
    adapters = [random_adapter(s, rank=4) for s in (1, 2, 3)]
    result = merge(adapters, None, "svd", rank=5)
    err_sq = sum(
        (merged_delta(result.adapter, m) - weighted_delta(adapters, [1 / 3] * 3, m)).pow(2).sum()
        for m in MODULE_SHAPES
    )
    total_sq = sum(weighted_delta(adapters, [1 / 3] * 3, m).pow(2).sum() for m in MODULE_SHAPES)
    assert abs(result.info["relative_error"] - float((err_sq / total_sq).sqrt())) < 1e-5


def test_non_finite_result_raises():
    huge = random_adapter(1, scaling=1e30)
    with pytest.raises(NonFiniteResultError):
        merge([huge, huge], [1e30, 1e30], "cat")


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"method": "nope"}, "method"),
        ({"method": "cat", "rank": 4}, "rank"),
        ({"method": "svd", "rank": 0}, "rank"),
        ({"method": "ties", "options": {"density": 0.0}}, "density"),
        ({"method": "ties", "options": {"density": 1.5}}, "density"),
        ({"method": "lego", "options": {"features": "pixels"}}, "features"),
        ({"method": "lego", "options": {"colour": 1}}, "colour"),
        ({"method": "cat", "weights": [1.0]}, "weights"),
        ({"method": "cat", "weights": [float("nan"), 1.0]}, "weights"),
        ({"method": "cat", "weights": [0.0, 0.0]}, "weights"),
    ],
)
def test_bad_arguments_raise_with_param(kwargs, param):
    adapters = [random_adapter(1), random_adapter(2)]
    weights = kwargs.pop("weights", [0.5, 0.5])
    with pytest.raises(InvalidMergeOptions) as info:
        merge(adapters, weights, **kwargs)
    assert info.value.param == param


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    weights=st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=4, max_size=4),
    seed=st.integers(0, 10_000),
)
def test_property_cat_is_the_exact_sum_and_lego_all_units_is_cat(ranks, weights, seed):
    adapters = [random_adapter(seed + i, rank=r, scaling=0.5 + i) for i, r in enumerate(ranks)]
    weights = weights[: len(ranks)]
    cat = merge(adapters, weights, "cat")
    lego = merge(adapters, weights, "lego", rank=sum(ranks), options={"param_reweight": "none"})
    for module in ("layers.0.v", "layers.1.down"):
        ref = weighted_delta(adapters, weights, module)
        assert rel(merged_delta(cat.adapter, module), ref) < 1e-5
        assert rel(merged_delta(lego.adapter, module), ref) < 1e-4


def test_kth_largest_is_exact_on_large_tensors():
    from merging.methods.delta import kth_largest

    values = torch.randn(5_000_000, generator=torch.Generator().manual_seed(0)).abs()
    for keep in (1, 1_234_567, 2_500_000, 4_999_999):
        assert kth_largest(values, keep) == values.kthvalue(values.numel() - keep + 1).values


# ---------------------------------------------------------------- per-module weights


@pytest.mark.parametrize("method", ALL_METHODS)
def test_module_weights_equal_to_the_global_weights_change_nothing(method):
    adapters = [random_adapter(1), random_adapter(2, rank=3)]
    plain = merge(adapters, [0.6, 0.4], method=method).adapter
    same = {module: [0.6, 0.4] for module in MODULE_SHAPES}
    with_rows = merge(adapters, [0.6, 0.4], method=method, module_weights=same).adapter
    for module in MODULE_SHAPES:
        assert torch.equal(merged_delta(plain, module), merged_delta(with_rows, module))


def test_module_weights_replace_the_weights_only_in_their_modules():
    adapters = [random_adapter(1), random_adapter(2, rank=3)]
    rows = {"layers.0.q": [0.9, 0.1], "layers.1.down": [0.0, 2.0]}
    merged = merge(adapters, [0.5, 0.5], method="cat", module_weights=rows).adapter
    for module in MODULE_SHAPES:
        expected = weighted_delta(adapters, rows.get(module, [0.5, 0.5]), module)
        assert rel(merged_delta(merged, module), expected) < 1e-6
    # A zero in a row leaves that adapter out of the module: only the second's rank remains.
    assert merged.modules["layers.1.down"].rank == 3


def test_module_weights_follow_zero_dropped_adapters():
    adapters = [random_adapter(1), random_adapter(2), random_adapter(3)]
    rows = {"layers.0.v": [0.2, 5.0, 0.8]}
    merged = merge(adapters, [0.5, 0.0, 0.5], method="cat", module_weights=rows).adapter
    expected = weighted_delta([adapters[0], adapters[2]], [0.2, 0.8], "layers.0.v")
    assert rel(merged_delta(merged, "layers.0.v"), expected) < 1e-6


@pytest.mark.parametrize(
    "rows, needle",
    [
        ({"layers.9.q": [0.5, 0.5]}, "no adapter has"),
        ({"layers.0.q": [0.5]}, "1 weights for 2 adapters"),
        ({"layers.0.q": [0.5, float("inf")]}, "not a finite number"),
    ],
)
def test_bad_module_weights_raise_with_param(rows, needle):
    with pytest.raises(InvalidMergeOptions, match=needle) as info:
        merge([random_adapter(1), random_adapter(2)], method="cat", module_weights=rows)
    assert info.value.param == "module_weights"


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_info_names_the_method_that_ran_for_a_single_adapter(method):
    # One adapter left (the other's weight is 0): a pruning method has no interference to
    # resolve and runs svd; the info says svd, and the result is svd's, not a pruned one.
    first, second = random_adapter(1, rank=4), random_adapter(2, rank=4)
    result = merge([first, second], [0.7, 0.0], method, options={"density": 0.2})
    svd = merge([first], [0.7], "svd")
    assert result.info["method"] == "svd"
    for module in MODULE_SHAPES:
        assert rel(merged_delta(result.adapter, module), merged_delta(svd.adapter, module)) < 1e-6
    both = merge([first, second], [0.7, 0.3], method, options={"density": 0.2})
    assert both.info["method"] == method
