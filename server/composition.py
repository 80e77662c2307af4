"""Compositions: the `model`-string grammar, the structured body field, and the canonical,
content-addressed CompositionSpec both turn into.

Model-string grammar (whitespace is not allowed):

    model    := term ("+" term)* ["@" method ["(" option ("," option)* ")"]]
    term     := skill ["*" weight]
    option   := key "=" value          # value: int, float, true/false, or a bare word

`math` is one skill at weight 1; `math+code` gives equal weights summing to 1 (0.5 each);
`math*0.7+code*0.3` uses the weights as given (either every term has a weight or none has);
`math+code@lego(k=8)` picks the method and its options. The option `rank` sets the target
rank of the merged adapter.

Per-module weights (`module_weights`, as learned by `loramix tune-cat`) do not fit in a model
string: they come in the `composition` field or with a named composition. The model string
of such a spec names them by digest (`...@cat(module_weights=<12 hex>)`) for display only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import merging

from server.errors import LoramixError, from_exception, invalid_composition

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_PATTERN)
_METHOD_RE = re.compile(r"[a-z][a-z0-9_]*")
_OPTION_RE = re.compile(r"(?P<key>[a-z][a-z0-9_]*)=(?P<value>[A-Za-z0-9._+-]+)")
_OPERATORS = ("+", "*", "@")
# Skills are trained to act at weight 1; far beyond that a composition only overflows (merged
# factors, then activations: NaN logits). Weights must satisfy 0 < |w| <= MAX_ABS_WEIGHT.
MAX_ABS_WEIGHT = 100.0


def is_valid_name(name: str) -> bool:
    """True if `name` can be a skill or composition name: no separators, no traversal."""
    return _NAME_RE.fullmatch(name) is not None  # fullmatch: `$` would accept "name\n"


def looks_like_composition(model: str) -> bool:
    """True if the model string uses composition syntax rather than naming one thing."""
    return any(op in model for op in _OPERATORS)


@dataclass(frozen=True)
class SkillTerm:
    """One skill of a composition as given, with its weight."""

    name: str
    weight: float


@dataclass(frozen=True)
class CompositionInput:
    """A composition as a client gave it (a model string, or the `composition` body field
    converted by the HTTP layer): skills in the given order, nothing validated beyond the
    syntax. canonical_spec() turns it into a CompositionSpec."""

    skills: tuple[SkillTerm, ...]
    method: str | None = None  # None: the server's default method
    options: Mapping[str, Any] = field(default_factory=dict)
    rank: int | None = None
    # {module: one weight per skill in `skills` order}; None: the skills' weights everywhere.
    module_weights: Mapping[str, Sequence[float]] | None = None


@dataclass(frozen=True)
class CompositionSpec:
    """A composition in canonical form: skills sorted by name, options normalized."""

    skills: tuple[tuple[str, float], ...]
    method: str
    options: tuple[tuple[str, Any], ...] = ()
    rank: int | None = None
    # (module, one weight per skill in `skills` order), sorted by module; empty: none.
    module_weights: tuple[tuple[str, tuple[float, ...]], ...] = ()

    @property
    def skill_names(self) -> list[str]:
        return [name for name, _ in self.skills]

    @property
    def weights(self) -> list[float]:
        return [weight for _, weight in self.skills]

    def canonical_json(self) -> str:
        """The spec as deterministic JSON (the input of the content-addressed key)."""
        body = {
            "skills": [[name, weight] for name, weight in self.skills],
            "method": self.method,
            "options": dict(self.options),
            "rank": self.rank,
        }
        if self.module_weights:  # absent otherwise, so keys of plain compositions never change
            body["module_weights"] = {module: list(row) for module, row in self.module_weights}
        return json.dumps(body, sort_keys=True, separators=(",", ":"))

    def module_weights_digest(self) -> str:
        """12 hex digits naming the per-module weights ("" when there are none)."""
        if not self.module_weights:
            return ""
        text = json.dumps([[m, list(row)] for m, row in self.module_weights], separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def model_string(self) -> str:
        """The canonical model string, which parses back to this spec."""
        terms = "+".join(f"{name}*{weight!r}" for name, weight in self.skills)
        options = dict(self.options)
        if self.rank is not None:
            options["rank"] = self.rank
        if self.module_weights:
            options["module_weights"] = self.module_weights_digest()
        suffix = ""
        if options:
            suffix = "(" + ",".join(f"{key}={_format_value(value)}" for key, value in sorted(options.items())) + ")"
        return f"{terms}@{self.method}{suffix}"

    def key(self, digests: dict[str, str]) -> str:
        """sha256 over the spec, each skill adapter's content digest and the merge algorithm
        version: the same request gives the same key on every replica, and a changed adapter
        or algorithm gives a new one."""
        hasher = hashlib.sha256()
        hasher.update(self.canonical_json().encode())
        for name in self.skill_names:
            hasher.update(b"\0" + name.encode() + b"=" + digests[name].encode())
        hasher.update(b"\0" + merging.MERGE_ALGORITHM_VERSION.encode())
        return hasher.hexdigest()


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_weight(text: str, term: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise invalid_composition(f"Weight '{text}' of term '{term}' is not a number.", "model") from None
    if not math.isfinite(weight) or weight == 0:
        raise invalid_composition(f"Weight of term '{term}' must be finite and non-zero.", "model")
    return weight


def _parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """Split `lego(k=8,seed=1)` into the method name and its raw options."""
    match = re.fullmatch(r"(?P<method>[^()]*)(?:\((?P<options>[^()]*)\))?", text)
    if not match or not _METHOD_RE.fullmatch(match["method"]):
        raise invalid_composition(f"Malformed method '{text}' in the model string.", "model")
    options: dict[str, Any] = {}
    if match["options"]:
        for item in match["options"].split(","):
            option = _OPTION_RE.fullmatch(item)
            if not option:
                raise invalid_composition(f"Malformed method option '{item}' (expected key=value).", "model")
            if option["key"] in options:
                raise invalid_composition(f"Method option '{option['key']}' is given twice.", "model")
            options[option["key"]] = _parse_value(option["value"])
    return match["method"], options


def parse_model_string(model: str) -> CompositionInput:
    """Parse a composition model string into a CompositionInput (as the `composition` field gives).

    Raises invalid_composition (400, param "model") for malformed strings."""
    if not model or any(ch.isspace() for ch in model):
        raise invalid_composition("The model string is empty or contains whitespace.", "model")
    terms_text, at, method_text = model.partition("@")
    if at and not method_text:
        raise invalid_composition("Malformed method: nothing follows '@'.", "model")
    if "@" in method_text:
        raise invalid_composition("The model string has more than one '@'.", "model")
    method, options = _parse_method(method_text) if method_text else (None, {})
    if "module_weights" in options:
        raise invalid_composition(
            "Per-module weights cannot be given in a model string; send them in the `composition` "
            "field or use a named composition (e.g. one made by `loramix tune-cat`).", "model")
    rank = options.pop("rank", None)
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise invalid_composition("Option 'rank' must be a positive integer.", "model")
    names: list[str] = []
    weights: list[float | None] = []
    for term in terms_text.split("+"):
        name, star, weight_text = term.partition("*")
        if not is_valid_name(name):
            raise invalid_composition(f"'{name}' is not a valid skill name.", "model")
        names.append(name)
        weights.append(_parse_weight(weight_text, term) if star else None)
    if len(set(names)) != len(names):
        raise invalid_composition("A skill appears more than once in the model string.", "model")
    if any(w is None for w in weights) and any(w is not None for w in weights):
        raise invalid_composition("Give a weight for every skill or for none (equal weights).", "model")
    if weights[0] is None:
        weights = [1.0 / len(names)] * len(names)
    skills = tuple(SkillTerm(name, weight) for name, weight in zip(names, weights))
    return CompositionInput(skills=skills, method=method, options=options, rank=rank)


def canonical_spec(
    request: CompositionInput, *, default_method: str, param_prefix: str = "composition"
) -> CompositionSpec:
    """Validate and normalize a composition: skill names, duplicates, method, options.

    Skill existence is checked by the caller (the registry); here only the form is checked."""
    names = [skill.name for skill in request.skills]
    for index, name in enumerate(names):
        if not is_valid_name(name):
            raise invalid_composition(f"'{name}' is not a valid skill name.", f"{param_prefix}.skills.{index}.name")
    if len(set(names)) != len(names):
        raise invalid_composition("A skill appears more than once.", f"{param_prefix}.skills")
    for index, skill in enumerate(request.skills):
        if not abs(skill.weight) <= MAX_ABS_WEIGHT:
            raise invalid_composition(
                f"The weight {skill.weight!r} of skill '{skill.name}' is out of range: "
                f"|weight| must be at most {MAX_ABS_WEIGHT:g}.", f"{param_prefix}.skills.{index}.weight")
    method = request.method or default_method
    options = dict(request.options)
    rank = request.rank
    if "rank" in options:
        raise invalid_composition("Give the target rank as `rank`, not as a method option.", f"{param_prefix}.options.rank")
    try:
        normalized = merging.validate_options(method, options)
    except merging.MergeError as exc:
        err = from_exception(exc, param_prefix=f"{param_prefix}.options")
        if err.param is None or err.param == f"{param_prefix}.options.method":
            err.param = f"{param_prefix}.method"
        raise err from None
    skills = tuple(sorted((skill.name, float(skill.weight)) for skill in request.skills))
    module_weights = _canonical_module_weights(request, names, param=f"{param_prefix}.module_weights")
    return CompositionSpec(
        skills=skills, method=method, options=tuple(sorted(normalized.items())), rank=rank,
        module_weights=module_weights,
    )


def _canonical_module_weights(
    request: CompositionInput, names: list[str], *, param: str
) -> tuple[tuple[str, tuple[float, ...]], ...]:
    """Rows reordered from the request's skill order to the canonical (sorted) one. Module
    names are checked against the adapters when merging."""
    if not request.module_weights:
        return ()
    order = sorted(range(len(names)), key=lambda i: names[i])
    rows = []
    for module, row in sorted(request.module_weights.items()):
        if len(row) != len(names):
            raise invalid_composition(
                f"module_weights['{module}'] has {len(row)} weights for {len(names)} skills.", param)
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in row):
            raise invalid_composition(f"module_weights['{module}'] must hold finite numbers.", param)
        if any(abs(w) > MAX_ABS_WEIGHT for w in row):
            raise invalid_composition(
                f"module_weights['{module}'] must hold weights with |weight| <= {MAX_ABS_WEIGHT:g}.", param)
        rows.append((module, tuple(float(row[i]) for i in order)))
    return tuple(rows)


def spec_from_model_string(model: str, *, default_method: str) -> CompositionSpec:
    """Parse and canonicalize a model string; errors carry param "model"."""
    request = parse_model_string(model)
    try:
        return canonical_spec(request, default_method=default_method, param_prefix="composition")
    except LoramixError as err:
        # The client wrote a string, not a structure: point at the field it actually sent.
        err.param = "model"
        raise
