"""Composition management: create (merge ahead of use, optionally under a name), list,
inspect and delete."""

from __future__ import annotations

import json
import logging
import re

from server.composition import CompositionInput, CompositionSpec, SkillTerm, canonical_spec, is_valid_name
from server.composition_info import CompositionInfo
from server.errors import LoramixError, invalid_request
from server.named import spec_from_dict
from server.protocol import CompositionRequest, CreateCompositionRequest
from server.state import ServerState

logger = logging.getLogger("loramix.compositions")

_KEY_RE = re.compile(r"[0-9a-f]{64}")


def composition_input(body: CompositionRequest | None) -> CompositionInput | None:
    """The `composition` body field as the composer takes it (the HTTP model stops here)."""
    if body is None:
        return None
    return CompositionInput(
        skills=tuple(SkillTerm(skill.name, skill.weight) for skill in body.skills),
        method=body.method, options=dict(body.options), rank=body.rank, module_weights=body.module_weights,
    )


def _not_found(name: str) -> LoramixError:
    return LoramixError(404, "composition_not_found", f"No composition named '{name}'.", param="name")


def _current_key(state: ServerState, spec: CompositionSpec) -> tuple[str | None, str | None]:
    """(key, None) for the skills as they are now, or (None, why the composition cannot be served)."""
    try:
        return state.composer.key(spec), None
    except LoramixError as exc:
        return None, exc.message


def describe(state: ServerState, spec: CompositionSpec, name: str | None = None, key: str | None = None) -> dict:
    """The public description of a composition: its spec, whether it can be served now (a
    skill it uses may have vanished or broken) and, once merged, the merge facts. `key`: that
    of a cached entry, which differs from the current one when a skill changed since."""
    composer = state.composer
    current, unusable_reason = _current_key(state, spec)
    if unusable_reason is None and key is not None and key != current:
        unusable_reason = "A skill it uses changed since it was merged; using it merges it again."
    key = key or current
    info = (composer.cache.peek(key) if key else None) or CompositionInfo()
    return {
        "id": name or spec.model_string(),
        "object": "composition",
        "name": name,
        "key": key,
        "usable": unusable_reason is None,
        "unusable_reason": unusable_reason,
        "model": spec.model_string(),
        "method": spec.method,
        "options": dict(spec.options),
        "requested_rank": spec.rank,
        "skills": [{"name": skill, "weight": weight} for skill, weight in spec.skills],
        "module_weights": (
            {"modules": len(spec.module_weights), "digest": spec.module_weights_digest()}
            if spec.module_weights else None
        ),
        "cached": composer.cache.tier(key) if key else None,
        "rank": info.rank,
        "merge_seconds": info.merge_seconds,
        "relative_error": info.relative_error,
        "compressed": info.compressed,
        "rank_before_compression": info.rank_before_compression,
        "compression_relative_error": info.compression_relative_error,
        "num_bytes": info.num_bytes,
        "sources": [vars(source) for source in info.sources] if info.sources is not None else None,
        "created": int(info.created) if info.created is not None else None,
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
        spec = canonical_spec(composition_input(request.composition), default_method=state.settings.default_method)
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
    """Named compositions, then cached ones; those whose skills vanished are listed as unusable."""
    composer = state.composer
    data = []
    for name in composer.named.names():
        spec = composer.named.get(name)
        if spec is not None:  # None: deleted by another process meanwhile
            data.append(describe(state, spec, name))
    named_keys = {item["key"] for item in data}
    for key in composer.cache.keys():
        spec = _spec_of(composer.cache.peek(key))
        if key in named_keys or spec is None:
            continue
        data.append(describe(state, spec, key=key))
    return {"object": "list", "data": data}


def _spec_of(info: CompositionInfo | None) -> CompositionSpec | None:
    """The spec stored with a cached entry, or None if there is none or it is unreadable."""
    if info is None or info.spec is None:
        return None
    try:
        return spec_from_dict(json.loads(info.spec))
    except Exception:  # noqa: BLE001 - a stored description of any shape must not fail a listing
        logger.warning("cache entry %s has an unreadable spec", str(info.key)[:12])
        return None


def get(state: ServerState, name: str) -> dict:
    """A named composition, or a cached one by key."""
    spec = state.composer.named.get(name)
    if spec is not None:
        return describe(state, spec, name)
    if _KEY_RE.fullmatch(name):
        spec = _spec_of(state.composer.cache.peek(name))
        if spec is not None:
            return describe(state, spec, key=name)
    raise _not_found(name)


async def delete(state: ServerState, name: str) -> dict:
    """Forget a name (its merged adapter stays cached), or drop a cached composition by key."""
    composer = state.composer
    if composer.named.delete(name):
        return {"id": name, "object": "composition", "deleted": True}
    if _KEY_RE.fullmatch(name) and await composer.cache.discard(name):
        return {"id": name, "object": "composition", "deleted": True}
    raise _not_found(name)
