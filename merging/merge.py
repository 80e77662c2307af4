"""merge(): run a method over every module of a set of adapters; compress(): lower an adapter's rank."""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import PurePath
from typing import Callable, Mapping, Sequence

import torch

from merging.adapter import LoraAdapter, LoraModule
from merging.errors import IncompatibleAdaptersError, InvalidMergeOptions, MergeFailedError, NonFiniteResultError
from merging.factors import all_finite, difference_sq, frobenius_sq, stack_factors, truncated_svd
from merging.methods.common import ModuleInputs
from merging.registry import MethodSpec, get_method, validate_options


# Methods that resolve interference between adapters (prune, elect signs). Given one adapter
# there is none to resolve: they run SINGLE_ADAPTER_METHOD (a weighted pass-through at rank k),
# and the info says so.
PRUNING_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SINGLE_ADAPTER_METHOD = "svd"


@dataclass
class MergeResult:
    adapter: LoraAdapter
    info: dict


def check_compatible(adapters: Sequence[LoraAdapter], names: Sequence[str], *, check_base_model: bool = True):
    """Raise IncompatibleAdaptersError listing every conflict: different base models (compared by
    their last path component) or different shapes for the same module."""
    problems = []
    if check_base_model:
        bases = {n: PurePath(a.base_model).name.lower() for n, a in zip(names, adapters) if a.base_model}
        if len(set(bases.values())) > 1:
            listing = ", ".join(f"{n}: {b}" for n, b in bases.items())
            problems.append(f"adapters were trained on different base models ({listing})")
    shapes: dict[str, tuple] = {}
    for name, adapter in zip(names, adapters):
        for module, lora in adapter.modules.items():
            shape = (lora.out_features, lora.in_features)
            first = shapes.setdefault(module, (shape, name))
            if first[0] != shape:
                problems.append(f"module {module!r} is {first[0]} in {first[1]!r} but {shape} in {name!r}")
    if problems:
        raise IncompatibleAdaptersError("adapters cannot be combined: " + "; ".join(problems))


def _check_weights(weights: Sequence[float], num_adapters: int) -> list[float]:
    if len(weights) != num_adapters:
        raise InvalidMergeOptions(f"{len(weights)} weights for {num_adapters} adapters", param="weights")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidMergeOptions(f"weight {w!r} is not a finite number", param="weights")
    return [float(w) for w in weights]


def _resolve_rank(method: str, rank: int | None, adapters: Sequence[LoraAdapter]) -> int | None:
    spec = get_method(method)
    if rank is None:
        return max(a.max_rank for a in adapters) if spec.takes_rank else None
    if not spec.takes_rank:
        raise InvalidMergeOptions(
            f"{method} has no target rank (its rank follows from its inputs); use svd or lego for rank k",
            param="rank",
        )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidMergeOptions(f"rank must be a positive integer, got {rank!r}", param="rank")
    return rank


def _check_module_weights(
    module_weights: Mapping[str, Sequence[float]], adapters: Sequence[LoraAdapter]
) -> dict[str, list[float]]:
    """Per-module weights (one per adapter, in the adapters' order) for modules of the adapters."""
    known = {m for a in adapters for m in a.modules}
    unknown = sorted(set(module_weights) - known)
    if unknown:
        listed = ", ".join(repr(m) for m in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
        raise InvalidMergeOptions(
            f"module_weights name {len(unknown)} module(s) that no adapter has: {listed}", param="module_weights"
        )
    checked = {}
    for module, row in module_weights.items():
        try:
            checked[module] = _check_weights(list(row), len(adapters))
        except InvalidMergeOptions as exc:
            raise InvalidMergeOptions(f"module_weights[{module!r}]: {exc}", param="module_weights") from None
    return checked


def _module_inputs(module, adapters, weights, dtype) -> ModuleInputs:
    # A zero weight leaves the adapter out of this module (it must not vote in TIES either).
    picked = [(a.modules[module], w) for a, w in zip(adapters, weights) if module in a.modules and w != 0.0]
    return ModuleInputs(
        module,
        [m.lora_a.to(dtype) for m, _ in picked],
        [m.lora_b.to(dtype) for m, _ in picked],
        [w for _, w in picked],
        [m.scaling for m, _ in picked],
    )


def _generator(seed: int, module: str) -> torch.Generator:
    """Per-module generator: results do not depend on the order modules are visited in."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


@dataclass(frozen=True)
class _MergePlan:
    """What merge() will do, decided before any module is touched: the adapters that take part
    (zero weights dropped), their weights, the method that really runs and its options."""

    adapters: list[LoraAdapter]
    weights: list[float]
    module_weights: dict[str, list[float]]
    method: MethodSpec  # the method that runs (may differ from the one asked for)
    options: dict
    rank: int | None


@dataclass
class _ErrorSums:
    """Squared Frobenius norms summed over modules, for the info's error ratios."""

    exact: float = 0.0
    error: float = 0.0
    target: float = 0.0
    residual: float = 0.0


def merge(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    method: str = "cat",
    rank: int | None = None,
    *,
    names: Sequence[str] | None = None,
    options: dict | None = None,
    module_weights: Mapping[str, Sequence[float]] | None = None,
    compute_dtype: torch.dtype = torch.float32,
    check_base_model: bool = True,
    progress: Callable[[str], None] | None = None,
) -> MergeResult:
    """Merge `adapters` with `weights` (default: equal, summing to 1) by `method`.

    `module_weights` ({module: one weight per adapter}, e.g. learned by `loramix tune-cat`)
    replaces `weights` in the modules it names; an adapter whose global weight is 0 is left
    out everywhere.

    Returns the merged adapter (scaling 1 per module, factors in `compute_dtype`, saved in the
    inputs' dtype) and an info dict: method (the one that ran: a pruning method given a single
    adapter runs svd), rank, options, seconds, num_modules and relative_error =
    ||ΔW_merged - Σ w_i ΔW_i||_F / ||Σ w_i ΔW_i||_F over all modules (0 for exact methods), plus
    compression_error for methods that compress a dense ΔW of their own.
    """
    started = time.perf_counter()
    module_weights = module_weights or {}
    weights, options = _validate(adapters, weights, method, options, names, module_weights, check_base_model)
    plan = _plan(adapters, weights, method, rank, options, module_weights)
    modules, sums = _merge_modules(plan, compute_dtype, progress)
    dtypes = {a.dtype for a in plan.adapters}
    merged = LoraAdapter(modules, plan.adapters[0].base_model, dtypes.pop() if len(dtypes) == 1 else torch.float32)
    return MergeResult(merged, _info(plan, merged, sums, time.perf_counter() - started))


def _validate(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None,
    method: str,
    options: dict | None,
    names: Sequence[str] | None,
    module_weights: Mapping[str, Sequence[float]],
    check_base_model: bool,
) -> tuple[list[float], dict]:
    """Check the inputs (something to merge, finite weights, a known method with valid
    options, compatible adapters, known modules in `module_weights`). Returns the weights
    (equal ones when none are given) and the options with their defaults."""
    if not adapters:
        raise InvalidMergeOptions("nothing to merge: no adapters given", param="skills")
    names = list(names or [f"adapter {i}" for i in range(len(adapters))])
    weights = _check_weights([1.0 / len(adapters)] * len(adapters) if weights is None else weights, len(adapters))
    options = validate_options(method, options)
    check_compatible(adapters, names, check_base_model=check_base_model)
    _check_module_weights(module_weights, adapters)
    return weights, options


def _plan(
    adapters: Sequence[LoraAdapter],
    weights: list[float],
    method: str,
    rank: int | None,
    options: dict,
    module_weights: Mapping[str, Sequence[float]],
) -> _MergePlan:
    """Drop zero-weight adapters, check the target rank, pick the method that runs."""
    # A zero weight means "absent": it must not vote in TIES' sign election or count in its mean.
    kept = [i for i, w in enumerate(weights) if w != 0.0]
    if not kept:
        raise InvalidMergeOptions("every weight is zero: nothing to merge", param="weights")
    adapters = [adapters[i] for i in kept]
    per_module = {m: [float(row[i]) for i in kept] for m, row in module_weights.items()}
    target_rank = _resolve_rank(method, rank, adapters)
    spec = get_method(method)
    if len(adapters) == 1 and spec.name in PRUNING_METHODS:
        spec = get_method(SINGLE_ADAPTER_METHOD)  # one adapter: no interference to resolve
    return _MergePlan(adapters, [weights[i] for i in kept], per_module, spec, options, target_rank)


def _merge_modules(
    plan: _MergePlan, compute_dtype: torch.dtype, progress: Callable[[str], None] | None
) -> tuple[dict[str, LoraModule], _ErrorSums]:
    """Run the planned method over every module; sum the squared norms the info reports.
    Raises MergeFailedError when non-zero inputs give an all-zero adapter."""
    modules: dict[str, LoraModule] = {}
    sums = _ErrorSums()
    is_input_nonzero = is_output_nonzero = False
    for module in sorted({m for a in plan.adapters for m in a.modules}):
        inputs = _module_inputs(module, plan.adapters, plan.module_weights.get(module, plan.weights), compute_dtype)
        if not inputs.lora_as:
            continue  # every weight of this module is zero: ΔW = 0, nothing to store
        out = _run_method(plan, inputs)
        is_input_nonzero = is_input_nonzero or _is_nonzero(inputs.lora_bs, inputs.lora_as)
        is_output_nonzero = is_output_nonzero or _is_nonzero([out.lora_b], [out.lora_a])
        _add_errors(sums, plan.method, inputs, out)
        modules[module] = LoraModule(out.lora_a.contiguous(), out.lora_b.contiguous(), 1.0)
        if progress:
            progress(module)
    if is_input_nonzero and not is_output_nonzero:
        raise MergeFailedError(
            f"{plan.method.name} produced an all-zero adapter from non-zero inputs (the weights are "
            "outside the range the factors' float precision can represent)")
    return modules, sums


def _add_errors(sums: _ErrorSums, method: MethodSpec, inputs: ModuleInputs, out) -> None:
    """Add one module's squared norms: the exact ΔW and the error against it (inexact methods
    only; exact ones have error 0 by construction), and the method's own compression residual."""
    if not method.exact:
        exact_b, exact_a = stack_factors(inputs.lora_bs, inputs.lora_as, inputs.coefs)
        sums.exact += frobenius_sq(exact_b, exact_a)
        sums.error += difference_sq(out.lora_b, out.lora_a, exact_b, exact_a)
    if out.target_sq is not None:
        sums.target += out.target_sq
        sums.residual += out.residual_sq


def _info(plan: _MergePlan, merged: LoraAdapter, sums: _ErrorSums, seconds: float) -> dict:
    info = {
        "method": plan.method.name,
        "rank": merged.max_rank,
        "options": plan.options,
        "weights": plan.weights,
        "module_weights": len(plan.module_weights),
        "num_modules": len(merged.modules),
        "exact": plan.method.exact,
        "relative_error": _ratio(sums.error, sums.exact),
        "seconds": seconds,
    }
    if sums.target > 0:
        info["compression_error"] = _ratio(sums.residual, sums.target)
    return info


def _run_method(plan: _MergePlan, inputs: ModuleInputs):
    """One module through the planned method; raises MergeFailedError when the result is unusable."""
    method = plan.method
    extra = {"generator": _generator(plan.options["seed"], inputs.name)} if method.uses_seed else {}
    try:
        out = method.fn(inputs, plan.rank, **plan.options, **extra)
    except torch.linalg.LinAlgError:
        raise MergeFailedError(
            f"{method.name} failed in module {inputs.name!r}: a matrix decomposition did not converge "
            "(the weighted factors are too large or not finite)") from None
    if not (all_finite(out.lora_a) and all_finite(out.lora_b)):
        raise NonFiniteResultError(f"{method.name} produced non-finite values in module {inputs.name!r}")
    return out


def _is_nonzero(lora_bs: Sequence[torch.Tensor], lora_as: Sequence[torch.Tensor]) -> bool:
    """Whether some pair of factors has non-zero entries on both sides (a non-zero update,
    barring exact cancellation)."""
    return any(bool(b.any()) and bool(a.any()) for b, a in zip(lora_bs, lora_as))


def _ratio(error_sq: float, total_sq: float) -> float:
    return math.sqrt(error_sq / total_sq) if total_sq > 0 else 0.0


def compress(adapter: LoraAdapter, rank: int) -> MergeResult:
    """Lower every module above `rank` to its optimal rank-`rank` truncation (factored SVD).

    info: rank, original_rank, relative_error (of ΔW, over all modules), seconds, compressed.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise InvalidMergeOptions(f"rank must be a positive integer, got {rank!r}", param="rank")
    started = time.perf_counter()
    modules, total_sq, error_sq = {}, 0.0, 0.0
    for name, lora in adapter.modules.items():
        lora_b = lora.lora_b.float() * lora.scaling
        lora_a = lora.lora_a.float()
        total_sq += frobenius_sq(lora_b, lora_a)
        if lora.rank > rank:
            try:
                new_b, new_a, singular = truncated_svd(lora_b, lora_a, rank)
            except torch.linalg.LinAlgError:
                raise MergeFailedError(
                    f"compressing module {name!r} failed: the SVD did not converge") from None
            if not (all_finite(new_b) and all_finite(new_a)):
                raise NonFiniteResultError(f"compressing module {name!r} produced non-finite values")
            error_sq += float(singular[rank:].double().pow(2).sum())
            lora_b, lora_a = new_b, new_a
        modules[name] = LoraModule(lora_a.contiguous(), lora_b.contiguous(), 1.0)
    result = LoraAdapter(modules, adapter.base_model, adapter.dtype, dict(adapter.extra_config))
    info = {
        "rank": result.max_rank,
        "original_rank": adapter.max_rank,
        "compressed": adapter.max_rank > rank,
        "relative_error": _ratio(error_sq, total_sq),
        "seconds": time.perf_counter() - started,
    }
    return MergeResult(result, info)
