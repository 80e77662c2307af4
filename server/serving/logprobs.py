"""What a choice answers beyond the generated text: the echoed prompt and logprobs, in the
shape of each endpoint (OpenAI's, as vLLM's OpenAI server fills it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from server.engines.base import TokenLogprobs
from server.protocol import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob

# JSON has no -inf; OpenAI and vLLM answer this floor instead.
MIN_LOGPROB = -9999.0

TokenTexts = Callable[[list[int]], list[str]]


@dataclass
class ChoiceOutput:
    """One choice (or one stream delta of it) as the endpoint answers it."""

    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | ChatLogprobs | None = None


@dataclass
class Echo:
    """The prompt a text completion echoes: its text, token ids and whether only the prompt
    is answered (`max_tokens: 0`)."""

    text: str
    token_ids: list[int]
    only_prompt: bool = False


def _floor(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


class CompletionChoiceFormatter:
    """One text-completion choice: the echoed prompt in front of its first output, and
    logprobs whose `text_offset` keeps counting over the deltas of a stream."""

    def __init__(self, token_texts: TokenTexts, num_logprobs: int | None, echo: Echo | None) -> None:
        self.token_texts = token_texts
        self.num_logprobs = num_logprobs
        self.echo = echo
        self.is_echo_pending = echo is not None
        self.next_offset = 0

    def format(self, text: str, token_ids: list[int], logprobs: list[TokenLogprobs] | None,
               prompt_logprobs: list[TokenLogprobs | None] | None, finish_reason: str | None) -> ChoiceOutput:
        """The choice's text and logprobs for these new output tokens (and the prompt, once)."""
        entries: list[TokenLogprobs | None] = list(logprobs or [None] * len(token_ids))
        if self.echo is not None and self.echo.only_prompt:
            text, token_ids, entries = "", [], []
        if self.is_echo_pending:
            self.is_echo_pending = False
            text = self.echo.text + text
            token_ids = [*self.echo.token_ids, *token_ids]
            entries = [*(prompt_logprobs or [None] * len(self.echo.token_ids)), *entries]
        if self.num_logprobs is None:
            return ChoiceOutput(text, finish_reason)
        return ChoiceOutput(text, finish_reason, self._logprobs(list(token_ids), entries))

    def _logprobs(self, token_ids: list[int], entries: list[TokenLogprobs | None]) -> CompletionLogprobs:
        tokens = self.token_texts(token_ids)
        out = CompletionLogprobs(tokens=tokens)
        for token, entry in zip(tokens, entries):
            out.text_offset.append(self.next_offset)
            self.next_offset += len(token)
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(_floor(entry.logprob))
            # The chosen token, then the N most likely (OpenAI: up to N + 1 entries).
            top_ids = [entry.token_id, *(token_id for token_id, _ in entry.top)]
            values = [entry.logprob, *(value for _, value in entry.top)]
            out.top_logprobs.append(dict(zip(self.token_texts(top_ids), map(_floor, values))))
        return out


class ChatChoiceFormatter:
    """One chat choice: each output token with its logprob and the N most likely tokens."""

    def __init__(self, token_texts: TokenTexts, num_logprobs: int | None) -> None:
        self.token_texts = token_texts
        self.num_logprobs = num_logprobs

    def format(self, text: str, token_ids: list[int], logprobs: list[TokenLogprobs] | None,
               prompt_logprobs: list[TokenLogprobs | None] | None, finish_reason: str | None) -> ChoiceOutput:
        if self.num_logprobs is None:
            return ChoiceOutput(text, finish_reason)
        content = [self._entry(entry) for entry in logprobs or []]
        return ChoiceOutput(text, finish_reason, ChatLogprobs(content=content))

    def _entry(self, entry: TokenLogprobs) -> ChatTokenLogprob:
        top_ids = [token_id for token_id, _ in entry.top]
        token, *top_tokens = self.token_texts([entry.token_id, *top_ids])
        top = [TopLogprob(token=text, logprob=_floor(value), bytes=list(text.encode()))
               for text, (_, value) in zip(top_tokens, entry.top)]
        return ChatTokenLogprob(token=token, logprob=_floor(entry.logprob), bytes=list(token.encode()),
                                top_logprobs=top)


ChoiceFormatter = CompletionChoiceFormatter | ChatChoiceFormatter
