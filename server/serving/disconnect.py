"""Stopping a request's work when its client goes away.

A stream stops when its generator is closed (stream_sequences aborts the engine sequences in
its `finally`). A non-streaming handler is not told by anyone, so it runs as a task that is
cancelled when the client's disconnect arrives, as vLLM's `with_cancellation` does; the
cancellation reaches the same `finally`, which aborts the sequences in the engine."""

from __future__ import annotations

import asyncio
from typing import Awaitable

from fastapi import Request, Response

# nginx's "client closed request"; nobody reads it, but /metrics counts it.
CLIENT_CLOSED_REQUEST = 499


async def _wait_for_disconnect(request: Request) -> None:
    # The handler already read the whole body, so the next message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, handler: Awaitable[Response]) -> Response:
    """The response of `handler`, or 499 after cancelling it if the client disconnected first.
    A StreamingResponse returns at once, and the watch ends there."""
    work = asyncio.ensure_future(handler)
    watch = asyncio.ensure_future(_wait_for_disconnect(request))
    watch.add_done_callback(lambda task: task.cancelled() or task.exception())  # retrieved, not logged
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work in done:
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    return Response(status_code=CLIENT_CLOSED_REQUEST)
