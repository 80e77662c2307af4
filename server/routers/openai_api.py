"""OpenAI endpoints: /v1/models, /v1/models/{model}, /v1/chat/completions, /v1/completions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request, Response

from server.auth import require_api_key
from server.openapi import GENERATION_ERRORS, V1_ERRORS, error_responses
from server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from server.serving.completions import CompletionService
from server.serving.disconnect import cancel_on_disconnect
from server.serving.models import list_models, retrieve_model
from server.state import ServerState, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

# With `stream: true`: server-sent events (the schema describes one event, as before OpenAPI 3.2).
_SSE = {"text/event-stream": {"schema": {
    "type": "object",
    "required": ["data"],
    "properties": {"data": {
        "type": "string",
        "description": "A JSON chunk (the JSON answer's shape with `delta`s or text pieces), "
        "an error envelope if the stream fails, and finally `[DONE]`.",
    }},
}}}


def _generation_responses(model: type) -> dict:
    """200 as JSON (`model`) or, with `stream: true`, as server-sent events; then the errors."""
    return {
        200: {"model": model, "description": "The completion, or its chunks as SSE when streaming.",
              "content": _SSE},
        **error_responses(*GENERATION_ERRORS),
    }


@router.get("/models", response_model=ModelList, responses=error_responses(*V1_ERRORS))
async def models(state: ServerState = Depends(get_state)) -> ModelList:
    await state.composer.refresh_skills()
    return list_models(state)


ModelId = Annotated[str, Path(
    description="The base model, a skill, a named composition, or a composition string.", examples=["math+code"]
)]


@router.get("/models/{model:path}", response_model=ModelCard,
            responses=error_responses(400, 401, 404, 500))
async def model(model: ModelId, state: ServerState = Depends(get_state)) -> ModelCard:
    await state.composer.refresh_skills()
    return retrieve_model(state, model)


@router.post("/chat/completions", response_model=None, responses=_generation_responses(ChatCompletionResponse))
async def chat_completions(
    request: ChatCompletionRequest, raw_request: Request, state: ServerState = Depends(get_state)
) -> Response:
    return await cancel_on_disconnect(raw_request, CompletionService(state).chat(request))


@router.post("/completions", response_model=None, responses=_generation_responses(CompletionResponse))
async def completions(
    request: CompletionRequest, raw_request: Request, state: ServerState = Depends(get_state)
) -> Response:
    return await cancel_on_disconnect(raw_request, CompletionService(state).completion(request))
