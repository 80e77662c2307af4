"""Limits on the work one request may ask for: the size of its body (checked before it is
parsed) and the number of sequences it starts. Each refusal is counted by the setting that
refused it (loramix_rejected_requests_total{limit=...})."""

from __future__ import annotations

from collections import deque

from server import metrics
from server.errors import LoramixError, error_response, invalid_request
from server.settings import Settings


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def request_too_large(max_bytes: int) -> LoramixError:
    return LoramixError(
        413, "request_too_large", f"The request body exceeds this server's limit of {max_bytes} bytes."
    )


class RequestBodyLimitMiddleware:
    """Pure ASGI middleware refusing a body over `max_bytes` with 413 before the app parses it.

    A declared Content-Length is checked at once, without reading the body. A body without one
    (chunked) is read up to the limit and replayed to the app, so at most `max_bytes` are held."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)  # the server delivers no more than declared
            return
        messages = await self._read_body(receive)
        if messages is None:
            await self._refuse(scope, receive, send)
            return
        pending = deque(messages)

        async def replay():
            return pending.popleft() if pending else await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> list[dict] | None:
        """The messages up to the end of the body (or a disconnect), None past `max_bytes`."""
        messages, num_bytes = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            num_bytes += len(message.get("body", b""))
            if num_bytes > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _refuse(self, scope, receive, send) -> None:
        err = request_too_large(self.max_bytes)
        metrics.REJECTED_REQUESTS.labels(limit="max_request_bytes").inc()
        metrics.ERRORS.labels(endpoint=metrics.endpoint_label(scope), code=err.code).inc()
        # The unread rest of the body makes the connection unusable for another request.
        await error_response(err, headers={"Connection": "close"})(scope, receive, send)


def check_num_sequences(settings: Settings, num_prompts: int, n: int) -> None:
    """Refuse (400, naming the param) a request that would start more sequences than allowed."""
    if num_prompts > settings.max_prompts_per_request:
        metrics.REJECTED_REQUESTS.labels(limit="max_prompts_per_request").inc()
        raise invalid_request(
            f"A request may carry at most {settings.max_prompts_per_request} prompts; this one has {num_prompts}.",
            "prompt",
        )
    if num_prompts * n > settings.max_sequences_per_request:
        metrics.REJECTED_REQUESTS.labels(limit="max_sequences_per_request").inc()
        raise invalid_request(
            f"A request may start at most {settings.max_sequences_per_request} sequences (prompts x n); "
            f"this one asks for {num_prompts} x {n} = {num_prompts * n}. Lower n or send fewer prompts.",
            "n",
        )
