"""CompositionInfo: what is known of a merged composition, stored beside its adapter in the
disk tier as composition.json and read by the listings (GET /v1/compositions, /v1/models).

The file is shared by replicas and may come from another version of loramix or be damaged:
from_json() accepts any JSON value and raises CorruptInfo for anything that is not a sound
description of the given key. Every field but `key` and `created` may be absent (None)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["CompositionInfo", "CorruptInfo", "SourceSkill"]


class CorruptInfo(ValueError):
    """A stored composition.json that cannot describe its entry."""


@dataclass(frozen=True)
class SourceSkill:
    """A skill that went into a composition, as it was when merged."""

    skill: str
    weight: float
    digest: str
    rank: int


@dataclass(frozen=True)
class CompositionInfo:
    """A merged composition: what was merged, how, and what came out."""

    model: str | None = None  # canonical model string
    spec: str | None = None  # canonical JSON of the CompositionSpec
    method: str | None = None  # the merge method that ran (a pruning method given one skill runs svd)
    options: dict[str, Any] | None = None  # the method's options, defaults filled in
    weights: tuple[float, ...] | None = None  # the skills' weights, zero weights dropped
    num_module_weights: int | None = None  # modules with their own per-module weights
    num_modules: int | None = None
    rank: int | None = None  # of the served adapter (after compression)
    num_bytes: int | None = None
    exact: bool | None = None  # the method reproduces the weighted sum exactly
    relative_error: float | None = None  # of the merge against the exact weighted sum
    compression_error: float | None = None  # of a method's own rank-k compression
    compressed: bool | None = None  # lowered to the engine's max LoRA rank after merging
    rank_before_compression: int | None = None
    compression_relative_error: float | None = None
    seconds: float | None = None  # merge() alone
    merge_seconds: float | None = None  # load, merge, compress and save
    sources: tuple[SourceSkill, ...] | None = None
    key: str | None = None  # set by the cache when stored
    created: float | None = None  # time.time() when stored

    def to_json(self) -> dict[str, Any]:
        """The JSON object of composition.json (absent fields left out)."""
        data = {_JSON_NAMES.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        data["weights"] = list(self.weights) if self.weights is not None else None
        if self.sources is not None:
            data["sources"] = [vars(source) for source in self.sources]
        return {name: value for name, value in data.items() if value is not None}

    @classmethod
    def from_json(cls, data: Any, key: str) -> CompositionInfo:
        """The info stored for `key`; raises CorruptInfo naming what is wrong."""
        if not isinstance(data, dict):
            raise CorruptInfo("composition.json is not an object")
        if data.get("key") != key:
            raise CorruptInfo("composition.json is for another key")
        created = data.get("created")
        if not _is_number(created) or math.isnan(created):
            raise CorruptInfo("composition.json has no valid creation time")
        values = {}
        for f in fields(cls):
            name = _JSON_NAMES.get(f.name, f.name)
            if data.get(name) is not None:
                values[f.name] = _checked(f.name, data[name])
        return cls(**values)


# Fields stored under another name (the name composition.json has always used).
_JSON_NAMES = {"num_module_weights": "module_weights"}
_STR = ("model", "spec", "method", "key")
_INT = ("num_module_weights", "num_modules", "rank", "num_bytes", "rank_before_compression")
_FLOAT = ("relative_error", "compression_error", "compression_relative_error", "seconds", "merge_seconds", "created")
_BOOL = ("exact", "compressed")
_SOURCE_KEYS = {"skill", "weight", "digest", "rank"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked(name: str, value: Any) -> Any:
    """`value` of field `name` in its Python type; CorruptInfo if it has the wrong JSON type."""
    wrong = CorruptInfo(f"composition.json has a {_JSON_NAMES.get(name, name)} of the wrong type")
    if name in _STR:
        ok = isinstance(value, str)
    elif name in _INT:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif name in _FLOAT:
        ok = _is_number(value)
    elif name in _BOOL:
        ok = isinstance(value, bool)
    elif name == "options":
        ok = isinstance(value, dict)
    elif name == "weights":
        ok = isinstance(value, list) and all(_is_number(w) for w in value)
        value = tuple(value) if ok else value
    else:  # sources
        ok = isinstance(value, list) and all(_is_source(s) for s in value)
        value = tuple(SourceSkill(**{k: s[k] for k in _SOURCE_KEYS}) for s in value) if ok else value
    if not ok:
        raise wrong
    return value


def _is_source(value: Any) -> bool:
    return (isinstance(value, dict) and _SOURCE_KEYS <= set(value)
            and isinstance(value["skill"], str) and isinstance(value["digest"], str)
            and _is_number(value["weight"]) and isinstance(value["rank"], int) and not isinstance(value["rank"], bool))
