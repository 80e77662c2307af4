"""Composition management: POST/GET /v1/compositions, GET/DELETE /v1/compositions/{name}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.auth import require_api_key
from server.protocol import CreateCompositionRequest
from server.serving import compositions
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1/compositions", dependencies=[Depends(require_api_key)])


@router.post("")
async def create_composition(request: CreateCompositionRequest, state: ServerState = Depends(get_state)) -> dict:
    return await compositions.create(state, request)


@router.get("")
async def list_compositions(state: ServerState = Depends(get_state)) -> dict:
    await state.composer.refresh_skills()
    return compositions.list_all(state)


@router.get("/{name}")
async def get_composition(name: str, state: ServerState = Depends(get_state)) -> dict:
    await state.composer.refresh_skills()
    return compositions.get(state, name)


@router.delete("/{name}")
async def delete_composition(name: str, state: ServerState = Depends(get_state)) -> dict:
    return await compositions.delete(state, name)
