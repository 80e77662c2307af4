"""The OpenAPI document and the pages that show it.

The document matches what the server answers: each route declares the error statuses it can
return, all with OpenAI's error envelope; FastAPI's 422 is dropped (validation errors are 400
in the envelope); the bearer scheme is declared when an API key is configured.

Public surface: without an API key, /openapi.json, /docs and /redoc are open. With a key,
/openapi.json needs the key like every /v1 route, and /docs and /redoc are off, since a
browser page cannot send the bearer header its document needs."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from server.auth import require_api_key
from server.protocol import ErrorResponse
from server.settings import Settings

OPENAPI_PATH = "/openapi.json"
_ERROR_REF = f"#/components/schemas/{ErrorResponse.__name__}"

_DESCRIPTIONS = {
    400: "Invalid request: a malformed body, a bad field value or composition (`param` names the field).",
    401: "Missing or wrong API key (only when the server has one configured).",
    404: "No such model, skill or composition.",
    413: "Request body too large.",
    429: "Too many requests in flight (retry later).",
    500: "Server error; the details are in the server log, never in the answer.",
    503: "The server is overloaded or its engine is not running.",
}

# What every route under /v1 can answer besides 200, what a merge adds, and a generation.
V1_ERRORS = (401, 500)
MERGE_ERRORS = (400, 401, 404, 413, 429, 500)
GENERATION_ERRORS = (*MERGE_ERRORS, 503)


def error_responses(*statuses: int) -> dict[int | str, dict]:
    """`responses=` for a route: each status with the error envelope and what it means."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def build_document(app: FastAPI, settings: Settings) -> dict:
    """The OpenAPI document of `app` under `settings` (the bearer scheme only with a key)."""
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = document.get("components", {}).get("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for operation in _operations(document):
        operation["responses"].pop("422", None)
        for status, response in operation["responses"].items():
            if not status.startswith("2"):  # JSON even where the route answers text (/metrics)
                response["content"] = {"application/json": {"schema": {"$ref": _ERROR_REF}}}
        if settings.api_key and "401" in operation["responses"]:
            operation["security"] = [{"bearer": []}]
    if settings.api_key:
        document.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The server's API key."}
        }
    return document


def _operations(document: dict):
    for path_item in document.get("paths", {}).values():
        yield from path_item.values()


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the document at /openapi.json (behind the key when one is configured) and, only
    without a key, the Swagger UI at /docs and ReDoc at /redoc."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi

    @app.get(OPENAPI_PATH, include_in_schema=False, dependencies=[Depends(require_api_key)])
    async def openapi_document() -> JSONResponse:
        return JSONResponse(app.openapi())

    if settings.api_key:
        return

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_PATH, title=f"{app.title} - Swagger UI")

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI_PATH, title=f"{app.title} - ReDoc")
