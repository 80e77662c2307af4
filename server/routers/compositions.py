"""Composition management: POST/GET /v1/compositions, GET/DELETE /v1/compositions/{name}."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path

from server.auth import require_api_key
from server.openapi import MERGE_ERRORS, V1_ERRORS, error_responses
from server.protocol import CompositionDeleted, CompositionList, CompositionObject, CreateCompositionRequest
from server.serving import compositions
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1/compositions", dependencies=[Depends(require_api_key)])

CompositionName = Annotated[str, Path(
    description="A composition name, or the 64-hex cache key of a cached composition.", examples=["math-and-code"]
)]


@router.post("", response_model=CompositionObject, responses=error_responses(*MERGE_ERRORS))
async def create_composition(request: CreateCompositionRequest, state: ServerState = Depends(get_state)) -> dict:
    return await compositions.create(state, request)


@router.get("", response_model=CompositionList, responses=error_responses(*V1_ERRORS))
async def list_compositions(state: ServerState = Depends(get_state)) -> dict:
    await state.composer.refresh_skills()
    return compositions.list_all(state)


@router.get("/{name}", response_model=CompositionObject, responses=error_responses(404, *V1_ERRORS))
async def get_composition(name: CompositionName, state: ServerState = Depends(get_state)) -> dict:
    await state.composer.refresh_skills()
    return compositions.get(state, name)


@router.delete("/{name}", response_model=CompositionDeleted, responses=error_responses(404, *V1_ERRORS))
async def delete_composition(name: CompositionName, state: ServerState = Depends(get_state)) -> dict:
    return await compositions.delete(state, name)
