"""Operations endpoints: GET /health and GET /metrics (no API key, for probes and scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from server import metrics
from server.state import ServerState, get_state

router = APIRouter()


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> dict:
    return {
        "status": "ok",
        "model": state.base_name,
        "skills": state.composer.registry.names(),
        "unusable_skills": {name: p.reason for name, p in state.composer.registry.snapshot()[1].items()},
        "engine": state.engine.health(),
    }


@router.get("/metrics")
async def prometheus_metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)
