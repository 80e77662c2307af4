"""POST /v1/chat/completions and POST /v1/completions: resolve the composition, pin its
merged adapter, run the choices on the engine, answer as JSON or as an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from server import metrics
from server.composer import Resolved
from server.engines.base import AdapterHandle, GenerationDelta, SamplingOptions
from server.errors import from_exception, invalid_request
from server.limits import check_num_sequences
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, Usage
from server.serving.generation import (
    SequenceJob,
    SequenceResult,
    accumulate,
    collect_sequences,
    count_tokens,
    stream_sequences,
)
from server.serving.logprobs import (ChatChoiceFormatter, ChoiceFormatter, ChoiceOutput,
                                     CompletionChoiceFormatter, Echo)
from server.serving.shapes import CHAT, COMPLETIONS, EndpointShape
from server.state import ServerState


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _jobs(prompts: list[list[int]], request: SamplingFields, max_tokens: int) -> list[SequenceJob]:
    """One job per (prompt, n); choice index = prompt index * n + j, as OpenAI numbers them."""
    jobs = []
    for prompt_index, prompt_ids in enumerate(prompts):
        for j in range(request.n):
            sampling = SamplingOptions(
                max_tokens=max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                seed=None if request.seed is None else request.seed + j,
                stop=request.stop_strings(),
                ignore_eos=request.ignore_eos,
                logprobs=request.num_logprobs(),
                prompt_logprobs=request.num_prompt_logprobs(),
            )
            jobs.append(SequenceJob(prompt_index * request.n + j, prompt_ids, sampling))
    return jobs


def _usage(prompts: list[list[int]], results: list[SequenceResult]) -> Usage:
    """Prompt tokens count once per prompt (not per choice), as OpenAI counts them."""
    usage = Usage()
    usage.add(sum(len(p) for p in prompts), sum(r.num_output_tokens for r in results))
    return usage


@dataclass
class Generation:
    """One request, ready to run: its id, composition, jobs and pinned adapter."""

    shape: EndpointShape
    request_id: str
    resolved: Resolved
    prompts: list[list[int]]
    jobs: list[SequenceJob]
    handle: AdapterHandle | None
    adapter_pin: contextlib.AsyncExitStack
    formatters: dict[int, ChoiceFormatter]  # choice index -> its echo and logprobs

    def output(self, index: int, item: SequenceResult | GenerationDelta) -> ChoiceOutput:
        """A choice's result or stream delta as the endpoint answers it."""
        return self.formatters[index].format(item.text, item.token_ids, item.logprobs,
                                             item.prompt_logprobs, item.finish_reason)


class CompletionService:
    """The logic of both completion endpoints."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def chat(self, request: ChatCompletionRequest) -> Response:
        started = time.perf_counter()
        check_num_sequences(self.state.settings, 1, request.n)
        resolved = await self._resolve(request)
        # Tokenizing (and rendering the template) off the event loop: a long prompt must not
        # stall every other request.
        prompts = [await asyncio.to_thread(self.state.encoder.chat, request.messages)]
        max_tokens = request.output_budget() or self.state.settings.default_max_tokens
        formatter = lambda prompt_index: ChatChoiceFormatter(self.state.encoder.token_texts,
                                                             request.num_logprobs())
        return await self._run(CHAT, request, resolved, prompts, max_tokens, started, formatter)

    async def completion(self, request: CompletionRequest) -> Response:
        started = time.perf_counter()
        check_num_sequences(self.state.settings, len(request.prompts()), request.n)
        resolved = await self._resolve(request)
        encode = self.state.encoder.text
        prompts = await asyncio.to_thread(lambda: [encode(p) for p in request.prompts()])
        budget = request.output_budget()
        if budget == 0 and not request.echo:
            raise invalid_request("max_tokens must be at least 1 (0 only with echo: true).", "max_tokens")
        # max_tokens 0 (only with echo): one token is generated, none answered (as vLLM).
        max_tokens = 16 if budget is None else max(budget, 1)
        echoes = [self._echo(text, ids, budget == 0) if request.echo else None
                  for text, ids in zip(request.prompts(), prompts)]
        formatter = lambda prompt_index: CompletionChoiceFormatter(
            self.state.encoder.token_texts, request.num_logprobs(), echoes[prompt_index])
        return await self._run(COMPLETIONS, request, resolved, prompts, max_tokens, started, formatter)

    def _echo(self, prompt: str | list[int], token_ids: list[int], only_prompt: bool) -> Echo:
        text = prompt if isinstance(prompt, str) else self.state.encoder.decode(token_ids)
        return Echo(text, token_ids, only_prompt)

    async def _resolve(self, request: SamplingFields) -> Resolved:
        unsupported = request.unsupported_fields()
        if unsupported:
            raise invalid_request(f"'{unsupported[0]}' is not supported by this server.", unsupported[0])
        await self.state.composer.refresh_skills()
        return self.state.composer.resolve(request.model, request.composition)

    async def _run(self, shape, request, resolved, prompts, max_tokens, started, formatter) -> Response:
        pin = contextlib.AsyncExitStack()
        handle = await pin.enter_async_context(self.state.composer.adapter(resolved.spec))
        jobs = _jobs(prompts, request, max_tokens)
        generation = Generation(
            shape, f"{shape.id_prefix}-{uuid.uuid4().hex}", resolved, prompts, jobs, handle, pin,
            {job.index: formatter(job.index // request.n) for job in jobs},
        )
        # The server's own share of the latency (resolve, tokenize, merged adapter), as a
        # standard Server-Timing header.
        headers = {"Server-Timing": f"compose;dur={1e3 * (time.perf_counter() - started):.3f}"}
        if not request.stream:
            return JSONResponse(await self._complete(generation), headers=headers)
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(self._stream(generation, include_usage), media_type="text/event-stream",
                                 headers=headers)

    async def _complete(self, gen: Generation) -> dict:
        async with gen.adapter_pin:
            results = await collect_sequences(self.state.engine, gen.request_id, gen.jobs, gen.handle)
        count_tokens(results)
        outputs = [gen.output(job.index, result) for job, result in zip(gen.jobs, results)]
        body = gen.shape.respond(gen.request_id, int(time.time()), gen.resolved.model_name, outputs,
                                 _usage(gen.prompts, results))
        return body.model_dump()

    async def _stream(self, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
        """SSE events: an opening chunk per choice, deltas, then usage (if asked) and [DONE].
        An error after the stream started becomes an error event followed by [DONE]."""
        created, model, chunk = int(time.time()), gen.resolved.model_name, gen.shape.chunk
        results = {job.index: SequenceResult() for job in gen.jobs}
        try:
            async with gen.adapter_pin:
                for job in gen.jobs:
                    opening = chunk(gen.request_id, job.index, None, created, model)
                    if opening is not None:
                        yield _sse(opening)
                async for index, delta in stream_sequences(self.state.engine, gen.request_id, gen.jobs, gen.handle):
                    accumulate(results[index], delta)
                    yield _sse(chunk(gen.request_id, index, gen.output(index, delta), created, model))
            ordered = [results[job.index] for job in gen.jobs]
            count_tokens(ordered)
            if include_usage:
                yield _sse(chunk(gen.request_id, -1, _usage(gen.prompts, ordered), created, model))
        except Exception as exc:  # noqa: BLE001 - every failure becomes an in-stream error event
            err = from_exception(exc)
            metrics.ERRORS.labels(endpoint=gen.shape.path, code=err.code).inc()
            yield _sse(json.dumps(err.envelope()))
        yield _sse("[DONE]")
