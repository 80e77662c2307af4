"""One request inside the local engine: its prompt, adapter slot, sampler and output stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from server.engines.base import AdapterHandle, GenerationDelta, SamplingOptions, TokenLogprobs
from server.engines.local.sampling import IncrementalDetokenizer, StopChecker, TokenSampler


@dataclass(eq=False)  # identity: two requests are never the same row
class Sequence:
    """A request's state. The worker thread advances it; `emit` hands deltas (or an
    exception) to the request's asyncio queue. `is_aborted` may be set from the event loop."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingOptions
    adapter: AdapterHandle | None
    emit: Callable[[GenerationDelta | BaseException], None]
    max_total_len: int
    tokenizer: object
    eos_token_ids: frozenset[int]
    slot: int = -1
    output_token_ids: list[int] = field(default_factory=list)
    is_admitted: bool = False
    is_finished: bool = False
    is_aborted: bool = False
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # set at prefill, sent once

    def __post_init__(self) -> None:
        sampling = self.sampling
        self.sampler = TokenSampler(sampling, self.eos_token_ids)
        self.detokenizer = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids,
                                                  sampling.skip_special_tokens)
        self.stop_checker = StopChecker(sampling.stop, sampling.include_stop_str_in_output)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def next_position(self) -> int:
        """Position id of the last output token, the input of the next decode step."""
        return self.num_prompt_tokens + len(self.output_token_ids) - 1

    @property
    def is_done(self) -> bool:
        return self.is_finished or self.is_aborted

    def append_token(self, token_id: int, logprobs: list[TokenLogprobs] | None = None) -> None:
        """Record a sampled token (and its logprobs, if asked for), decide whether the
        request is finished, emit the delta."""
        self.output_token_ids.append(token_id)
        finish_reason = self._finish_reason(token_id)
        is_final = finish_reason is not None
        if self._is_stop_token(token_id) and not self.sampling.include_stop_str_in_output:
            text = self.detokenizer.flush()  # as vLLM: the stop token's text is left out
        else:
            text = self.detokenizer.add(token_id, final=is_final)
        past_min_tokens = len(self.output_token_ids) > self.sampling.min_tokens
        text, hit_stop = self.stop_checker.feed(text, final=is_final, search=past_min_tokens)
        if hit_stop:
            finish_reason = "stop"
        self.is_finished = finish_reason is not None
        self.emit(GenerationDelta(
            text=text,
            token_ids=[token_id],
            finish_reason=finish_reason,
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=len(self.output_token_ids),
            logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs if len(self.output_token_ids) == 1 else None,
        ))

    def _is_stop_token(self, token_id: int) -> bool:
        return ((token_id in self.eos_token_ids and not self.sampling.ignore_eos)
                or token_id in self.sampling.stop_token_ids)

    def _finish_reason(self, token_id: int) -> str | None:
        if self._is_stop_token(token_id):
            return "stop"
        if len(self.output_token_ids) >= self.sampling.max_tokens:
            return "length"
        if self.num_prompt_tokens + len(self.output_token_ids) >= self.max_total_len:
            return "length"
        return None

    def emit_abort(self) -> None:
        """End the stream of an aborted request (finish_reason "abort", as the vLLM engine)."""
        self.emit(GenerationDelta(
            text="", finish_reason="abort", num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=len(self.output_token_ids)))
