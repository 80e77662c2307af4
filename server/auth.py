"""Optional API key: `Authorization: Bearer <key>` on every /v1 route when one is configured."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import LoramixError


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 invalid_api_key unless the bearer token matches."""
    expected = request.app.state.settings.api_key
    if not expected:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), expected.encode()):
        raise LoramixError(401, "invalid_api_key", "Incorrect or missing API key.", type="authentication_error")
