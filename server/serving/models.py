"""GET /v1/models and GET /v1/models/{model}: the base model (with the skills that are not usable and why), every usable
skill, named compositions and cached compositions."""

from __future__ import annotations

from server.protocol import ModelCard, ModelList
from server.state import ServerState


def list_models(state: ServerState) -> ModelList:
    composer = state.composer
    created = int(state.started)
    skills, problems = composer.registry.snapshot()
    # Unusable skills are no models a client can use: they are listed on the base model's card.
    unusable = [{"name": name, "code": p.code, "reason": p.reason} for name, p in sorted(problems.items())]
    cards = [ModelCard(id=state.base_name, created=created, loramix={"kind": "base", "unusable_skills": unusable})]
    for name, skill in sorted(skills.items()):
        cards.append(ModelCard(
            id=name, created=created, root=state.base_name, parent=state.base_name,
            loramix={"kind": "skill", "rank": skill.rank, "digest": skill.digest},
        ))
    for name in composer.named.names():
        spec = composer.named.get(name)
        if spec is None:  # deleted by another process meanwhile
            continue
        cards.append(ModelCard(
            id=name, created=int(composer.named.created(name) or created), root=state.base_name,
            parent=state.base_name, loramix={"kind": "named_composition", "composition": spec.model_string()},
        ))
    for key in composer.cache.keys():
        info = composer.cache.peek(key)
        if info is None or info.model is None:
            continue
        cards.append(ModelCard(
            id=info.model, created=int(info.created), root=state.base_name, parent=state.base_name,
            loramix={"kind": "composition", "key": key, "rank": info.rank, "tier": composer.cache.tier(key)},
        ))
    return ModelList(data=cards)


def retrieve_model(state: ServerState, model: str) -> ModelCard:
    """The card of one model: a listed one (base, skill, named or cached composition), or any
    composition string the server can serve (its card says it is not merged yet). Unknown
    skills are 404 model_not_found; a malformed composition string is 400 invalid_composition."""
    for card in list_models(state).data:
        if card.id == model:
            return card
    resolved = state.composer.resolve(model)
    return ModelCard(
        id=model, created=int(state.started), root=state.base_name, parent=state.base_name,
        loramix={"kind": "composition", "composition": resolved.spec.model_string(), "cached": False},
    )
