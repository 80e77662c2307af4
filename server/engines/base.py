"""The engine interface: what the composition service needs from an inference engine.

Two implementations: `local` (transformers + kernels/, the embedded default and the
reference) and `vllm` (vLLM's AsyncLLM). The server tokenizes prompts itself (one tokenizer,
one chat template) and hands the engine token ids; the engine streams token deltas back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator


@dataclass(frozen=True)
class AdapterHandle:
    """A merged adapter as the engine sees it.

    adapter_id: stable positive integer derived from the composition key (vLLM's lora_int_id).
    name: the canonical composition string (unique among live adapters; vLLM's lora_name).
    path: a PEFT adapter directory on disk (adapter_config.json + adapter_model.safetensors).
    rank: the adapter's rank (already <= the engine's max_lora_rank).
    """

    adapter_id: int
    name: str
    path: Path
    rank: int


@dataclass(frozen=True)
class SamplingOptions:
    """Per-request sampling settings (OpenAI semantics). temperature 0 means greedy.

    The second block holds vLLM's sampling extensions, with vLLM's names, defaults (all
    "off") and meanings: presence and frequency penalties count the output tokens only;
    repetition_penalty scales the logits of every token seen in prompt or output (positive
    ones divided, negative ones multiplied); top_k 0 or -1 keeps every token; min_p drops
    tokens whose probability is below min_p times the top token's; min_tokens forbids EOS
    and stop_token_ids (and stop strings) before that many output tokens; a stop token id
    ends the sequence like EOS; the text of a stop token or stop string is left out unless
    include_stop_str_in_output."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # vLLM's sampling extensions
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    # Log-probabilities (vLLM's default `raw_logprobs`: log_softmax of the model's logits
    # before temperature, top-p or penalties). None: not computed. N >= 0: each sampled
    # token's logprob plus the N most likely tokens at that step.
    logprobs: int | None = None
    # The same for the prompt's tokens (the first prompt token has none), for `echo`.
    prompt_logprobs: int | None = None

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's log-probabilities.

    token_id / logprob: the token at this position (sampled, or the prompt's) and its logprob.
    top: the N most likely tokens at this position as (token_id, logprob), most likely first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationDelta:
    """One step of a generation stream.

    text: newly decoded text since the previous delta (stop strings already cut off).
    token_ids: the new token ids.
    finish_reason: None while running, then "stop" (EOS or a stop string), "length"
        (max_tokens reached) or "abort" (the request was aborted).
    num_prompt_tokens / num_output_tokens: running totals, for `usage`.
    logprobs: one entry per token in token_ids, when `SamplingOptions.logprobs` is set.
    prompt_logprobs: one entry per prompt token (None for the first), on the first delta
        only, when `SamplingOptions.prompt_logprobs` is set.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class EngineError(RuntimeError):
    """An engine failed to do what was asked (not a client error)."""


class EngineRequestError(EngineError):
    """The engine refuses the request as asked (a client error, HTTP 400).

    code: an OpenAI-style string code (`invalid_request_error`, `context_length_exceeded`...).
    param: the request field at fault, if one is.
    The message must be safe to show a client (no paths, no internals).
    """

    def __init__(self, message: str, *, code: str = "invalid_request_error", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


class NonFiniteOutputError(EngineRequestError):
    """One sequence's logits became NaN or infinite (typically a composition whose weights
    are too large). That sequence fails; the others in its batch are unaffected."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="non_finite_output", param="model")


class Engine(abc.ABC):
    """Inference engine with per-request LoRA adapters.

    Contract:
    - `start()` loads the model; `shutdown()` frees it. Both idempotent.
    - `add_adapter(handle)` makes the adapter usable by `generate`; adding an id that is
      already present is a no-op. `remove_adapter(id)` forgets it (no-op if absent).
      An engine may evict adapters on its own (LRU over its slots) and reload them from
      `handle.path` when a request names them again.
    - `generate(...)` yields GenerationDelta objects; the last one has finish_reason set.
      Requests with different adapters run concurrently in the same batch.
    - `abort(request_id)` stops a running generation (client disconnected).
    """

    name: str = "engine"
    # Longest context (prompt + output) in tokens, known once started; None: no limit.
    max_model_len: int | None = None

    @property
    @abc.abstractmethod
    def max_lora_rank(self) -> int: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    @abc.abstractmethod
    async def add_adapter(self, handle: AdapterHandle) -> None: ...

    @abc.abstractmethod
    async def remove_adapter(self, adapter_id: int) -> None: ...

    @abc.abstractmethod
    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        adapter: AdapterHandle | None = None,
    ) -> AsyncIterator[GenerationDelta]: ...

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    def health(self) -> dict:
        """A small JSON-able status dict (engine name, loaded adapters, queue length...)."""
        return {"engine": self.name}

    def request_counts(self) -> tuple[int, int]:
        """(running, waiting): sequences being decoded, and sequences queued for a batch."""
        return 0, 0

    def lora_requests_info(self) -> tuple[list[str], list[str], int] | None:
        """(running adapter names, waiting adapter names, max_loras) for vLLM's
        `vllm:lora_requests_info` metric, or None when the engine exports it itself."""
        return None
