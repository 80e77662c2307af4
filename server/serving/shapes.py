"""Response bodies and stream chunks of the two completion endpoints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    Usage,
)
from server.serving.logprobs import ChoiceOutput

# item of a stream chunk: None opens a choice, a ChoiceOutput continues it, a Usage ends
# the stream (index -1).
ChunkItem = ChoiceOutput | Usage | None


@dataclass(frozen=True)
class EndpointShape:
    """How one endpoint names its ids and shapes its answers."""

    path: str
    id_prefix: str
    respond: Callable[[str, int, str, list[ChoiceOutput], Usage], object]
    chunk: Callable[[str, int, ChunkItem, int, str], str | None]
    prompt_param: str  # the request field that holds the prompt, for errors about it


def chat_response(request_id: str, created: int, model: str, results: list[ChoiceOutput], usage: Usage):
    choices = [
        ChatChoice(index=i, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                   logprobs=r.logprobs)
        for i, r in enumerate(results)
    ]
    return ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)


def chat_chunk(request_id: str, index: int, item: ChunkItem, created: int, model: str) -> str:
    if isinstance(item, Usage):
        return ChatCompletionChunk(id=request_id, created=created, model=model, choices=[], usage=item).model_dump_json()
    if item is None:
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))
    else:
        content = item.text if item.text or item.finish_reason is None else None
        choice = ChatChunkChoice(index=index, delta=DeltaMessage(content=content), finish_reason=item.finish_reason,
                                 logprobs=item.logprobs)
    chunk = ChatCompletionChunk(id=request_id, created=created, model=model, choices=[choice])
    return chunk.model_dump_json(exclude_none=True)


def completion_response(request_id: str, created: int, model: str, results: list[ChoiceOutput], usage: Usage):
    choices = [CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason, logprobs=r.logprobs)
               for i, r in enumerate(results)]
    return CompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)


def completion_chunk(request_id: str, index: int, item: ChunkItem, created: int, model: str) -> str | None:
    if isinstance(item, Usage):
        return CompletionResponse(id=request_id, created=created, model=model, choices=[], usage=item).model_dump_json()
    if item is None:
        return None  # text completions have no opening chunk
    choice = CompletionChoice(index=index, text=item.text, finish_reason=item.finish_reason, logprobs=item.logprobs)
    chunk = CompletionResponse(id=request_id, created=created, model=model, choices=[choice])
    return chunk.model_dump_json(exclude={"usage"})


CHAT = EndpointShape("/v1/chat/completions", "chatcmpl", chat_response, chat_chunk, "messages")
COMPLETIONS = EndpointShape("/v1/completions", "cmpl", completion_response, completion_chunk, "prompt")
