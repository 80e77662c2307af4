"""Optional API key: `Authorization: Bearer <key>` on every /v1 route when one is configured."""

from __future__ import annotations

import secrets

from fastapi import Request

from server.errors import LoramixError


def is_authorized(request: Request) -> bool:
    """Whether the request may see everything: no key is configured, or its bearer token matches."""
    expected = request.app.state.settings.api_key
    if not expected:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), expected.encode())


async def require_api_key(request: Request) -> None:
    """FastAPI dependency: 401 invalid_api_key unless the bearer token matches."""
    if not is_authorized(request):
        raise LoramixError(401, "invalid_api_key", "Incorrect or missing API key.", type="authentication_error")
