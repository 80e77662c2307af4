"""Running several sequences (choices) of one request on the engine and merging their streams."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio

from server import metrics
from server.engines.base import AdapterHandle, Engine, GenerationDelta, SamplingOptions, TokenLogprobs


@dataclass(frozen=True)
class SequenceJob:
    """One output sequence: its choice index, prompt ids and sampling options."""

    index: int
    prompt_token_ids: list[int]
    sampling: SamplingOptions


@dataclass
class SequenceResult:
    """The accumulated output of one choice."""

    text: str = ""
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


_DONE = object()


async def _run_one(
    engine: Engine, request_id: str, job: SequenceJob, adapter: AdapterHandle | None, queue: asyncio.Queue
) -> None:
    started = time.perf_counter()
    previous: float | None = None
    try:
        async for delta in engine.generate(request_id, job.prompt_token_ids, job.sampling, adapter):
            now = time.perf_counter()
            if delta.token_ids:
                if previous is None:
                    metrics.TIME_TO_FIRST_TOKEN.observe(now - started)
                else:
                    metrics.INTER_TOKEN_LATENCY.observe(now - previous)
                previous = now
            await queue.put((job.index, delta))
        await queue.put((job.index, _DONE))
    except BaseException as exc:  # the consumer re-raises it on the request's task
        await queue.put((job.index, exc))
        if isinstance(exc, asyncio.CancelledError):
            raise


async def stream_sequences(
    engine: Engine, request_id: str, jobs: list[SequenceJob], adapter: AdapterHandle | None
) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """Run every job concurrently and yield (choice index, delta) as deltas arrive.

    If the consumer stops early (client disconnect, error), the unfinished sequences are
    aborted in the engine so their batch slots are freed."""
    queue: asyncio.Queue = asyncio.Queue()
    ids = {job.index: f"{request_id}-{job.index}" for job in jobs}
    tasks = [asyncio.create_task(_run_one(engine, ids[job.index], job, adapter, queue)) for job in jobs]
    running = set(ids)
    try:
        while running:
            index, item = await queue.get()
            if item is _DONE:
                running.discard(index)
            elif isinstance(item, BaseException):
                running.discard(index)
                raise item
            else:
                yield index, item
    finally:
        # Shielded: on a client disconnect the response's cancel scope is cancelled, and
        # the aborts must still reach the engine.
        with anyio.CancelScope(shield=True):
            for task in tasks:
                task.cancel()
            for index in running:
                await engine.abort(ids[index])
                metrics.ABORTED_SEQUENCES.inc()
            await asyncio.gather(*tasks, return_exceptions=True)


async def collect_sequences(
    engine: Engine, request_id: str, jobs: list[SequenceJob], adapter: AdapterHandle | None
) -> list[SequenceResult]:
    """Run every job to completion; results in job order."""
    results = {job.index: SequenceResult() for job in jobs}
    async for index, delta in stream_sequences(engine, request_id, jobs, adapter):
        accumulate(results[index], delta)
    return [results[job.index] for job in jobs]


def accumulate(result: SequenceResult, delta: GenerationDelta) -> None:
    """Fold one delta into a sequence's result."""
    result.text += delta.text
    result.num_prompt_tokens = max(result.num_prompt_tokens, delta.num_prompt_tokens)
    result.num_output_tokens = max(result.num_output_tokens, delta.num_output_tokens)
    if delta.finish_reason is not None:
        result.finish_reason = delta.finish_reason
    result.token_ids += delta.token_ids
    if delta.logprobs is not None:
        result.logprobs = (result.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        result.prompt_logprobs = delta.prompt_logprobs


def count_tokens(results: list[SequenceResult]) -> None:
    """Add the results' token counts to the token metrics."""
    metrics.PROMPT_TOKENS.inc(sum(r.num_prompt_tokens for r in results))
    metrics.COMPLETION_TOKENS.inc(sum(r.num_output_tokens for r in results))
