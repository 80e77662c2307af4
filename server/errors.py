"""One error type for client-visible failures and the single place that maps exceptions to
OpenAI's error envelope: {"error": {"message", "type", "param", "code"}} with string codes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import merging

from server import metrics
from server.engines.base import EngineRequestError
from server.protocol import ErrorDetail, ErrorResponse

logger = logging.getLogger("loramix.errors")


class LoramixError(Exception):
    """A failure the client sees as an OpenAI error envelope with HTTP `status`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _default_type(status)

    def envelope(self) -> dict:
        """The OpenAI error body."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=detail).model_dump()


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def model_not_found(name: str, param: str = "model") -> LoramixError:
    """The model, skill or named composition `name` does not exist."""
    return LoramixError(404, "model_not_found", f"The model '{name}' does not exist.", param=param)


def invalid_composition(message: str, param: str | None = None) -> LoramixError:
    """A composition (model string or `composition` field) is malformed."""
    return LoramixError(400, "invalid_composition", message, param=param)


def invalid_request(message: str, param: str | None = None) -> LoramixError:
    """A request field has a bad value."""
    return LoramixError(400, "invalid_request_error", message, param=param)


def internal_error() -> LoramixError:
    """A server-side failure; the details are logged, never sent."""
    return LoramixError(500, "internal_error", "The server had an error while processing the request.")


def from_exception(exc: BaseException, param_prefix: str | None = None) -> LoramixError:
    """Map any exception to the LoramixError a client should see.

    Merging errors carry a path-free message and an optional `param` (e.g. an option name);
    `param_prefix` places that param inside the request (e.g. "composition.options")."""
    if isinstance(exc, LoramixError):
        return exc
    if isinstance(exc, EngineRequestError):
        return LoramixError(400, exc.code, exc.message, param=exc.param)
    if isinstance(exc, merging.MergeError):
        param = getattr(exc, "param", None)
        if param and param_prefix:
            param = f"{param_prefix}.{param}"
        if isinstance(exc, merging.IncompatibleAdaptersError):
            return LoramixError(400, "incompatible_adapters", str(exc), param=param or "model")
        if isinstance(exc, merging.InvalidMergeOptions):
            return LoramixError(400, "invalid_composition", str(exc), param=param)
        if isinstance(exc, merging.NonFiniteResultError):
            return LoramixError(400, "merge_failed", str(exc), param=param)
        if isinstance(exc, merging.AdapterError):
            return LoramixError(400, "invalid_adapter", str(exc), param=param or "model")
        return LoramixError(400, "merge_failed", str(exc), param=param)
    logger.exception("unhandled error", exc_info=exc)
    return internal_error()


def error_response(err: LoramixError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response carrying `err`."""
    return JSONResponse(err.envelope(), status_code=err.status, headers=headers)


def _validation_param(exc: RequestValidationError) -> tuple[str | None, str]:
    """The dotted location of the first invalid field (without the leading "body") and a message."""
    errors = exc.errors()
    if not errors:
        return None, "Invalid request."
    first = errors[0]
    if first.get("type") == "json_invalid":
        return None, "The request body is not valid JSON."
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    # pydantic adds the union member / validator names to the location; drop those that are
    # not field names so `param` reads like the request's own keys.
    loc = [part for part in loc if not part.startswith(("function-", "list[", "dict["))]
    param = ".".join(loc) or None
    message = first.get("msg", "Invalid value")
    if param:
        message = f"{message} (at '{param}')"
    return param, message


def _respond(request: Request, err: LoramixError, headers: dict[str, str] | None = None) -> JSONResponse:
    metrics.ERRORS.labels(endpoint=metrics.endpoint_label(request.scope), code=err.code).inc()
    return error_response(err, headers)


class UnhandledErrorMiddleware:
    """Answers an exception no handler took with the 500 envelope.

    Starlette's own catch-all (ServerErrorMiddleware) re-raises after answering, and the ASGI
    server then closes the connection; caught here, the 500 is an ordinary response and the
    connection stays open for the next request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception as exc:
            if started:  # part of a response is out; no envelope can follow it
                raise
            await _respond(Request(scope), from_exception(exc))(scope, receive, send)


def register_exception_handlers(app: FastAPI) -> None:
    """Install the handlers that turn every failure into OpenAI's envelope. Add this before
    any middleware that should see the final status (e.g. request metrics)."""

    @app.exception_handler(LoramixError)
    async def _loramix(request: Request, exc: LoramixError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _respond(request, exc, headers)

    @app.exception_handler(EngineRequestError)
    async def _engine_request(request: Request, exc: EngineRequestError) -> JSONResponse:
        return _respond(request, from_exception(exc))

    @app.exception_handler(merging.MergeError)
    async def _merge(request: Request, exc: merging.MergeError) -> JSONResponse:
        return _respond(request, from_exception(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _validation_param(exc)
        return _respond(request, invalid_request(message, param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = LoramixError(404, "not_found", f"Unknown route {request.method} {request.url.path}.")
        elif exc.status_code == 405:
            err = LoramixError(405, "method_not_allowed", f"Method {request.method} is not allowed here.")
        else:
            err = LoramixError(exc.status_code, "http_error", str(exc.detail))
        return _respond(request, err, getattr(exc, "headers", None))

    # Exceptions from routes and handlers stop at the middleware; this catch-all only sees
    # those from middleware outside it.
    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _respond(request, from_exception(exc))

    app.add_middleware(UnhandledErrorMiddleware)
