"""Composition management: create (merge ahead of use, optionally under a name), list,
inspect and delete."""

from __future__ import annotations

import json
import re

from server.composition import CompositionSpec, canonical_spec, is_valid_name
from server.errors import LoramixError, invalid_request
from server.named import spec_from_dict
from server.protocol import CreateCompositionRequest
from server.state import ServerState

_KEY_RE = re.compile(r"[0-9a-f]{64}")


def _not_found(name: str) -> LoramixError:
    return LoramixError(404, "composition_not_found", f"No composition named '{name}'.", param="name")


def describe(state: ServerState, spec: CompositionSpec, name: str | None = None) -> dict:
    """The public description of a composition: its spec and, once merged, the merge facts."""
    composer = state.composer
    key = composer.key(spec)
    info = composer.cache.peek(key) or {}
    return {
        "id": name or spec.model_string(),
        "object": "composition",
        "name": name,
        "key": key,
        "model": spec.model_string(),
        "method": spec.method,
        "options": dict(spec.options),
        "requested_rank": spec.rank,
        "skills": [{"name": skill, "weight": weight} for skill, weight in spec.skills],
        "module_weights": (
            {"modules": len(spec.module_weights), "digest": spec.module_weights_digest()}
            if spec.module_weights else None
        ),
        "cached": composer.cache.tier(key),
        "rank": info.get("rank"),
        "merge_seconds": info.get("merge_seconds"),
        "relative_error": info.get("relative_error"),
        "compressed": info.get("compressed"),
        "rank_before_compression": info.get("rank_before_compression"),
        "compression_relative_error": info.get("compression_relative_error"),
        "num_bytes": info.get("num_bytes"),
        "sources": info.get("sources"),
        "created": int(info["created"]) if "created" in info else None,
    }


def _check_new_name(state: ServerState, name: str) -> None:
    if not is_valid_name(name):
        raise invalid_request(
            "A composition name uses letters, digits, '.', '_' and '-' and starts with a letter or digit.", "name"
        )
    if name == state.base_name or name in state.composer.registry:
        raise invalid_request(f"'{name}' is already the name of the base model or a skill.", "name")


async def create(state: ServerState, request: CreateCompositionRequest) -> dict:
    """Merge the composition now (so the first request is fast) and, if named, save the name."""
    composer = state.composer
    await composer.refresh_skills()
    if request.name is not None:
        _check_new_name(state, request.name)
    if request.composition is not None:
        spec = canonical_spec(request.composition, default_method=state.settings.default_method)
        composer.check_skills(spec, skills_param="composition.skills", rank_param="composition.rank")
    else:
        spec = composer.resolve(request.model).spec
        if spec is None:
            raise invalid_request("The base model is not a composition; name at least one skill.", "model")
    entry = await composer.acquire(spec)
    await composer.cache.release(entry)
    if request.name is not None:
        composer.named.put(request.name, spec)
    return describe(state, spec, request.name)


def list_all(state: ServerState) -> dict:
    composer = state.composer
    data = [describe(state, composer.named.get(name), name) for name in composer.named.names()]
    named_keys = {item["key"] for item in data}
    for key in composer.cache.keys():
        info = composer.cache.peek(key)
        if key in named_keys or info is None or "spec" not in info:
            continue
        data.append(describe(state, _spec_of(info)))
    return {"object": "list", "data": data}


def _spec_of(info: dict) -> CompositionSpec:
    return spec_from_dict(json.loads(info["spec"]))


def get(state: ServerState, name: str) -> dict:
    """A named composition, or a cached one by key."""
    spec = state.composer.named.get(name)
    if spec is not None:
        return describe(state, spec, name)
    if _KEY_RE.fullmatch(name):
        info = state.composer.cache.peek(name)
        if info is not None and "spec" in info:
            return describe(state, _spec_of(info))
    raise _not_found(name)


async def delete(state: ServerState, name: str) -> dict:
    """Forget a name (its merged adapter stays cached), or drop a cached composition by key."""
    composer = state.composer
    if composer.named.delete(name):
        return {"id": name, "object": "composition", "deleted": True}
    if _KEY_RE.fullmatch(name) and await composer.cache.discard(name):
        return {"id": name, "object": "composition", "deleted": True}
    raise _not_found(name)
