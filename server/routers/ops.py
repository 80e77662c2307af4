"""Operations endpoints for probes and scrapers, open without the API key: GET /health (the
details only to callers with the key, when one is configured) and GET /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from server import metrics
from server.auth import is_authorized
from server.openapi import error_responses
from server.protocol import HealthResponse
from server.state import ServerState, get_state

router = APIRouter()


@router.get("/health", response_model=HealthResponse, response_model_exclude_none=True,
            responses=error_responses(500))
async def health(request: Request, state: ServerState = Depends(get_state)) -> HealthResponse:
    if not is_authorized(request):
        return HealthResponse()
    return HealthResponse(
        model=state.base_name,
        skills=state.composer.registry.names(),
        unusable_skills={name: p.reason for name, p in state.composer.registry.snapshot()[1].items()} or None,
        engine=state.engine.health(),
    )


@router.get("/metrics", response_class=PlainTextResponse, responses={
    200: {"description": "Prometheus text exposition format (text/plain; version=...)."},
    **error_responses(500),
})
async def prometheus_metrics(state: ServerState = Depends(get_state)) -> PlainTextResponse:
    metrics.observe_engine(state.engine)
    body, content_type = metrics.render()
    return PlainTextResponse(body, media_type=content_type)
