"""POST /v1/chat/completions and POST /v1/completions: resolve the composition, pin its
merged adapter, run the choices on the engine, answer as JSON or as an SSE stream."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Response
from fastapi.responses import JSONResponse, StreamingResponse

from server import metrics
from server.composer import Resolved
from server.engines.base import AdapterHandle, EngineRequestError, GenerationDelta, SamplingOptions
from server.errors import LoramixError, from_exception, invalid_request
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
from server.serving.compositions import composition_input
from server.serving.logprobs import (ChatChoiceFormatter, ChoiceFormatter, ChoiceOutput,
                                     CompletionChoiceFormatter, Echo)
from server.serving.shapes import CHAT, COMPLETIONS, EndpointShape
from server.state import ServerState


# Characters JSON leaves unescaped that line readers split on (str.splitlines, which httpx's
# aiter_lines uses): a generated U+2028 would cut a `data:` line in two for such clients.
_LINE_BREAKS = str.maketrans({"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(payload: str) -> str:
    """One server-sent event. `payload` is JSON; inside its strings the escapes mean the same."""
    return f"data: {payload.translate(_LINE_BREAKS)}\n\n"


# SamplingOptions fields a request carries under the same name (None: the option's default).
_SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingOptions)
                         if f.name in SamplingFields.model_fields)


def sampling_options(request: SamplingFields, max_tokens: int, choice: int = 0) -> SamplingOptions:
    """The engine's options for one choice of `request` (choice j draws with seed + j)."""
    values = {name: getattr(request, name) for name in _SAMPLING_FIELDS if getattr(request, name) is not None}
    values.update(
        max_tokens=max_tokens,
        seed=None if request.seed is None else request.seed + choice,
        stop=request.stop_strings(),
        stop_token_ids=tuple(request.stop_token_ids or ()),
        logprobs=request.num_logprobs(),
        prompt_logprobs=request.num_prompt_logprobs(),
    )
    return SamplingOptions(**values)


def _jobs(prompts: list[list[int]], request: SamplingFields, max_tokens: int) -> list[SequenceJob]:
    """One job per (prompt, n); choice index = prompt index * n + j, as OpenAI numbers them."""
    jobs = []
    for prompt_index, prompt_ids in enumerate(prompts):
        for j in range(request.n):
            sampling = sampling_options(request, max_tokens, j)
            jobs.append(SequenceJob(prompt_index * request.n + j, prompt_ids, sampling))
    return jobs


def check_output_budget(request: SamplingFields, prompts: list[list[int]], max_tokens: int,
                        max_model_len: int | None, budget_param: str | None) -> None:
    """As vLLM's server: an explicit output budget must fit the context with every prompt
    (400 context_length_exceeded, not a silent clamp; without one, generation stops at the
    context's end), and min_tokens may not exceed it. budget_param: the field that set
    max_tokens, None if it is the default."""
    if request.min_tokens > max_tokens:
        raise invalid_request(f"min_tokens ({request.min_tokens}) must be at most max_tokens ({max_tokens}).",
                              "min_tokens")
    if budget_param is None or max_model_len is None:
        return
    longest = max(len(p) for p in prompts)
    if longest < max_model_len and longest + max_tokens > max_model_len:  # longer prompts: the engine's 400
        raise LoramixError(
            400, "context_length_exceeded",
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or {budget_param}.", param=budget_param)


def _endpoint_error(exc: BaseException, shape: EndpointShape) -> BaseException:
    """An engine's complaint about the prompt names the endpoint's prompt field."""
    if isinstance(exc, EngineRequestError) and exc.param == "prompt":
        return LoramixError(400, exc.code, exc.message, param=shape.prompt_param)
    return exc


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
        budget_param = ("max_completion_tokens" if request.max_completion_tokens
                        else "max_tokens" if request.max_tokens else None)
        check_output_budget(request, prompts, max_tokens, self.state.engine.max_model_len, budget_param)
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
        budget_param = "max_tokens" if request.max_tokens else None
        check_output_budget(request, prompts, max_tokens, self.state.engine.max_model_len, budget_param)
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
        return self.state.composer.resolve(request.model, composition_input(request.composition))

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
            try:
                results = await collect_sequences(self.state.engine, gen.request_id, gen.jobs, gen.handle)
            except EngineRequestError as exc:
                raise _endpoint_error(exc, gen.shape) from exc
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
            err = from_exception(_endpoint_error(exc, gen.shape))
            metrics.ERRORS.labels(endpoint=gen.shape.path, code=err.code).inc()
            yield _sse(json.dumps(err.envelope()))
        yield _sse("[DONE]")
