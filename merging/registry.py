"""Merge methods by name, their options, and option validation (one place, every problem at once)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from merging.errors import InvalidMergeOptions
from merging.methods.aligned import RULES
from merging.methods.cat import merge_cat
from merging.methods.core import merge_core
from merging.methods.delta import merge_dare_linear, merge_dare_ties, merge_magnitude_prune, merge_ties
from merging.methods.knots import merge_knots
from merging.methods.lego import merge_lego
from merging.methods.linear import merge_linear
from merging.methods.svd import merge_svd

MERGE_ALGORITHM_VERSION = "1"


@dataclass(frozen=True)
class OptionSpec:
    """A method option: its type, default, and allowed values or range."""

    kind: type
    default: Any
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def check(self, value: Any) -> str | None:
        """None when `value` is valid, else what is wrong with it."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, self.kind) or isinstance(value, bool) and self.kind is not bool:
            return f"must be {self.kind.__name__}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.kind is float and not math.isfinite(value):
            return "must be finite"
        too_small = self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        )
        if too_small or (self.maximum is not None and value > self.maximum):
            return f"must be {self._range()}"
        return None

    def _range(self) -> str:
        if self.maximum is None:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum}"
        if self.minimum is None:
            return f"<= {self.maximum}"
        return f"in {'(' if self.exclusive_minimum else '['}{self.minimum}, {self.maximum}]"


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: the per-module function, whether it takes a target rank, its options."""

    name: str
    fn: Callable
    doc: str
    takes_rank: bool
    exact: bool
    options: dict[str, OptionSpec] = field(default_factory=dict)
    uses_seed: bool = False
    # Given valid options: (name, why) for each set away from its default that would have no effect.
    unused_options: Callable[[dict], list[tuple[str, str]]] | None = None


_DENSITY = OptionSpec(float, 0.5, "fraction of ΔW entries kept", minimum=0.0, maximum=1.0, exclusive_minimum=True)
_SIGN = OptionSpec(str, "total", "sign election: sum of values or count of signs", choices=("total", "frequency"))
_SEED = OptionSpec(int, 0, "random seed (deterministic results for a seed)", minimum=0, maximum=2**32 - 1)
# For methods that align the tasks first and then merge them by a rule (knots, core): density
# applies to ties, dare_* and magnitude_prune, majority_sign_method to *ties, seed to dare_*.
_ALIGNED_OPTIONS = {
    "merge": OptionSpec(str, "ties", "merge rule in the aligned space", choices=RULES),
    "density": _DENSITY,
    "majority_sign_method": _SIGN,
    "seed": _SEED,
}


def _unused_by_rule(options: dict) -> list[tuple[str, str]]:
    """density is for ties, dare_* and magnitude_prune, majority_sign_method for *ties, seed for dare_*."""
    rule = options.get("merge", _ALIGNED_OPTIONS["merge"].default)
    used = {"density": rule != "linear", "majority_sign_method": rule.endswith("ties"), "seed": rule.startswith("dare")}
    return [
        (name, f"option {name!r} has no effect with merge={rule}")
        for name, is_used in used.items()
        if not is_used and name in options and options[name] != _ALIGNED_OPTIONS[name].default
    ]

METHODS: dict[str, MethodSpec] = {
    "cat": MethodSpec("cat", merge_cat, "exact weighted sum by concatenation; rank Σ r_i", False, True),
    "svd": MethodSpec("svd", merge_svd, "exact weighted sum truncated to rank k (optimal)", True, False),
    "lego": MethodSpec(
        "lego",
        merge_lego,
        "LoRA-LEGO: k-means over rank-1 units, dual reweighting",
        True,
        False,
        {
            "features": OptionSpec(str, "direction", "clustering features", choices=("direction", "raw")),
            "param_reweight": OptionSpec(str, "l2", "centroid norm rescale", choices=("l2", "maxabs", "none")),
            "output_reweight": OptionSpec(str, "none", "output scale sqrt(r/k)", choices=("sqrt", "none")),
            "seed": _SEED,
            "max_iter": OptionSpec(int, 100, "k-means iterations at most", minimum=1, maximum=10_000),
        },
        uses_seed=True,
    ),
    "linear": MethodSpec("linear", merge_linear, "peft-compatible factor averaging (cross terms)", False, False),
    "ties": MethodSpec(
        "ties", merge_ties, "TIES on ΔW, then rank k", True, False, {"density": _DENSITY, "majority_sign_method": _SIGN}
    ),
    "dare_linear": MethodSpec(
        "dare_linear", merge_dare_linear, "DARE + sum on ΔW, then rank k", True, False,
        {"density": _DENSITY, "seed": _SEED}, uses_seed=True,
    ),
    "dare_ties": MethodSpec(
        "dare_ties", merge_dare_ties, "DARE + TIES on ΔW, then rank k", True, False,
        {"density": _DENSITY, "majority_sign_method": _SIGN, "seed": _SEED}, uses_seed=True,
    ),
    "magnitude_prune": MethodSpec(
        "magnitude_prune", merge_magnitude_prune, "magnitude pruning + sum on ΔW, then rank k", True, False,
        {"density": _DENSITY},
    ),
    "knots": MethodSpec(
        "knots", merge_knots, "KnOTS: joint SVD of the ΔW_i, task rows merged by a rule; rank <= Σ r_i",
        False, False, _ALIGNED_OPTIONS, uses_seed=True, unused_options=_unused_by_rule,
    ),
    "core": MethodSpec(
        "core", merge_core, "Core Space: shared SVD bases of the B and A stacks, cores merged by a rule",
        False, False, _ALIGNED_OPTIONS, uses_seed=True, unused_options=_unused_by_rule,
    ),
}


def get_method(method: str) -> MethodSpec:
    if method not in METHODS:
        raise InvalidMergeOptions(
            f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}", param="method"
        )
    return METHODS[method]


def validate_options(method: str, options: dict | None) -> dict:
    """Options with defaults filled in; raises InvalidMergeOptions naming the first bad option
    and listing every problem. Integers given for float options become floats."""
    spec = get_method(method)
    options = dict(options or {})
    problems, first = [], None
    for name in sorted(set(options) - set(spec.options)):
        allowed = ", ".join(spec.options) or "none"
        problems.append(f"unknown option {name!r} for {method} (allowed: {allowed})")
        first = first or name
    for name, option in spec.options.items():
        if name in options:
            error = option.check(options[name])
            if error:
                problems.append(f"option {name!r} {error}")
                first = first or name
            elif option.kind is float:
                options[name] = float(options[name])
    if not problems and spec.unused_options:
        for name, why in spec.unused_options(options):
            problems.append(why)
            first = first or name
    if problems:
        raise InvalidMergeOptions("; ".join(problems), param=first)
    return {name: options.get(name, option.default) for name, option in spec.options.items()}
