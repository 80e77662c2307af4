"""OpenAI endpoints: /v1/models, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response

from server.auth import require_api_key
from server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from server.serving.completions import CompletionService
from server.serving.disconnect import cancel_on_disconnect
from server.serving.models import list_models
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/models", response_model=ModelList)
async def models(state: ServerState = Depends(get_state)) -> ModelList:
    await state.composer.refresh_skills()
    return list_models(state)


@router.post("/chat/completions")
async def chat_completions(
    request: ChatCompletionRequest, raw_request: Request, state: ServerState = Depends(get_state)
) -> Response:
    return await cancel_on_disconnect(raw_request, CompletionService(state).chat(request))


@router.post("/completions")
async def completions(
    request: CompletionRequest, raw_request: Request, state: ServerState = Depends(get_state)
) -> Response:
    return await cancel_on_disconnect(raw_request, CompletionService(state).completion(request))
