"""Request and response models of the OpenAI API subset loramix serves, plus loramix's
`composition` extension.

OpenAI's own request fields are parsed leniently: unknown fields are logged and ignored, so
clients that send newer fields keep working. The `composition` extension is strict: unknown
keys and bad values are a 400 that names the offending `param`."""

from __future__ import annotations

import logging
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

logger = logging.getLogger("loramix.protocol")


class LenientModel(BaseModel):
    """Accepts and logs fields it does not know (OpenAI adds fields over time)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.info("ignoring unsupported request fields: %s", sorted(self.model_extra))
        return self


class StrictModel(BaseModel):
    """loramix's own extension: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- composition extension


class SkillWeight(StrictModel):
    name: str = Field(description="Skill name (a sub-directory of the skills directory).")
    weight: float = Field(description="Weight of this skill's adapter in the composition.")

    @field_validator("weight")
    @classmethod
    def _finite_nonzero(cls, weight: float) -> float:
        if not math.isfinite(weight):
            raise ValueError("weight must be a finite number")
        if weight == 0:
            raise ValueError("weight must be non-zero (leave the skill out instead)")
        return weight


class CompositionRequest(StrictModel):
    """The structured `composition` body field: which skills, how much of each, how merged."""

    skills: list[SkillWeight] = Field(
        description="Skills with weights: a list of {name, weight} or a {name: weight} mapping."
    )
    method: str | None = Field(None, description="Merge method (default: the server's default method).")
    options: dict[str, Any] = Field(default_factory=dict, description="Options of the merge method.")
    rank: int | None = Field(None, ge=1, description="Target rank of the merged adapter.")
    module_weights: dict[str, list[float]] | None = Field(
        None,
        description="Per-module weights, {module: one weight per skill in `skills` order}, e.g. from "
        "`loramix tune-cat`; they replace the skills' weights in the modules they name.",
    )

    @field_validator("skills", mode="before")
    @classmethod
    def _mapping_to_list(cls, skills: Any) -> Any:
        if isinstance(skills, dict):
            return [{"name": name, "weight": weight} for name, weight in skills.items()]
        return skills

    @field_validator("skills")
    @classmethod
    def _non_empty(cls, skills: list[SkillWeight]) -> list[SkillWeight]:
        if not skills:
            raise ValueError("at least one skill is required")
        return skills


# ---------------------------------------------------------------- requests

MAX_LOGPROBS = 20  # most top logprobs per position (OpenAI's and vLLM's default limit)


class StreamOptions(LenientModel):
    include_usage: bool = False


class SamplingFields(LenientModel):
    """Fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1, description="A signed 64-bit integer, as in vLLM.")
    user: str | None = None
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past end-of-sequence.")
    composition: CompositionRequest | None = None
    # ---- penalties and vLLM's sampling extensions (vLLM's names, ranges and meanings; None
    # is vLLM's default: off). Their semantics are in server.engines.base.SamplingOptions.
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted once from the logit of every token already in the output.")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="Subtracted from a token's logit once per time it is in the output.")
    repetition_penalty: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="vLLM extension: logits of tokens in prompt or output are divided (if positive) or "
        "multiplied (if negative) by it; 1 is off.")
    top_k: int | None = Field(None, ge=-1, description="vLLM extension: keep the k likeliest tokens; 0 or -1 is off.")
    min_p: float | None = Field(
        None, ge=0, le=1, description="vLLM extension: drop tokens less likely than min_p times the likeliest.")
    min_tokens: int = Field(
        0, ge=0, description="vLLM extension: no EOS, stop token or stop string before this many output tokens.")
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, max_length=256, description="vLLM extension: token ids that end the sequence like EOS.")
    include_stop_str_in_output: bool = Field(
        False, description="vLLM extension: keep the stop string or stop token's text in the output.")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text.")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def stop_strings(self) -> tuple[str, ...]:
        return tuple(self.stop or ())

    def unsupported_fields(self) -> list[str]:
        """OpenAI fields set to a value this server would otherwise silently not honour."""
        extra = self.model_extra or {}
        return sorted(
            name for name, value in extra.items()
            if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]
        )


# OpenAI and vLLM request fields loramix does not implement, with the values that mean "not
# used". Set to anything else they would change the answer, so they are refused (400 naming
# the field). Fields in IGNORED_FIELDS are accepted and ignored; any other unknown field is
# logged and ignored, so clients that send fields newer than this list keep working.
_UNSUPPORTED: dict[str, tuple] = {
    "echo": (None, False),  # chat only: completions declare it
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    # vLLM's extensions
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "prompt_logprobs": (None,),
    "truncate_prompt_tokens": (None,),
    "spaces_between_special_tokens": (None, True),
    "structured_outputs": (None,),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "return_tokens_as_token_ids": (None, False),
    "logits_processors": (None, []),
    "vllm_xargs": (None, {}),
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "documents": (None, []),
}

# Request fields accepted and ignored, and why ignoring them cannot change an answer.
IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id for the caller's own abuse tracking",
    "metadata": "labels for OpenAI's stored completions; nothing is stored",
    "store": "OpenAI's stored completions; nothing is stored",
    "service_tier": "OpenAI's billing tiers; there is one tier",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache",
    "safety_identifier": "an end-user id for the caller's own abuse tracking",
    "parallel_tool_calls": "meaningful only with tools, which are refused",
    "priority": "vLLM's priority scheduling, off in vLLM by default; loramix schedules first come, first served",
    "cache_salt": "vLLM's prefix-cache isolation; loramix shares no prefix cache between requests",
}


class ContentPart(LenientModel):
    type: str
    text: str | None = None


class ChatMessage(LenientModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's text (text parts joined; other part types are rejected upstream)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError("only text content parts are supported")
        return content


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "math+code", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 16},
        {"model": "math", "messages": [{"role": "user", "content": "2 + 3 ="}], "max_tokens": 16,
         "stream": True, "stream_options": {"include_usage": True}},
    ]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="With `logprobs`: also the N most likely tokens at each position.")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top_logprobs

    def num_logprobs(self) -> int | None:
        """Top-N logprobs per output token for the engine (None: none asked for)."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def num_prompt_logprobs(self) -> int | None:
        return None  # chat does not echo

    def output_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "math+code@lego", "prompt": "2 + 3 =", "max_tokens": 16, "temperature": 0},
        {"model": "math", "prompt": ["2 + 3 =", "4 + 4 ="], "max_tokens": 16, "n": 2, "stream": True},
    ]})

    prompt: str | list[str] | list[int] | list[list[int]]
    # Completions only: with `echo`, 0 answers the prompt alone (lm-eval's loglikelihood).
    max_tokens: int | None = Field(None, ge=0)
    echo: bool = Field(False, description="Answer the prompt followed by the completion "
                       "(with `logprobs`: the prompt's tokens too, the first one with null).")
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS,
        description="Return each token's logprob and the N most likely tokens at each position.")

    def num_logprobs(self) -> int | None:
        """Top-N logprobs per token for the engine (None: none asked for)."""
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """Top-N logprobs per prompt token: with `echo`, the prompt's logprobs are answered."""
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    def output_budget(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each is text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


class CreateCompositionRequest(StrictModel):
    """POST /v1/compositions: pre-warm a composition, optionally under a name."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"name": "math-and-code", "model": "math+code@cat"},
        {"composition": {"skills": {"math": 0.7, "code": 0.3}, "method": "svd", "rank": 8}},
    ]})

    name: str | None = Field(None, description="Name under which clients can use it as `model`.")
    model: str | None = Field(None, description="A composition model string, e.g. 'math+code@lego'.")
    composition: CompositionRequest | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.model is None) == (self.composition is None):
            raise ValueError("give exactly one of `model` (a composition string) or `composition`")
        return self


# ---------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "loramix"
    root: str | None = None
    parent: str | None = None
    loramix: dict[str, Any] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogprobs(BaseModel):
    """Text completions' logprobs: per token its text, logprob (null for an echoed prompt's
    first token), {text: logprob} of the most likely tokens, and its offset in the text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """Chat completions' logprobs: one entry per output token."""

    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- tokenizer endpoints (as vLLM's)


class TokenizeRequest(LenientModel):
    """POST /tokenize: a text prompt, or chat messages rendered by the chat template."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "math+code", "prompt": "2 + 3 ="},
        {"messages": [{"role": "user", "content": "What is 2 + 3?"}]},
    ]})

    model: str | None = Field(None, description="Any served model (all share one tokenizer).")
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="Add the tokenizer's special tokens (BOS); default true for a "
        "prompt, false for messages (the template writes them).")
    add_generation_prompt: bool = Field(True, description="With messages: open the assistant turn.")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None
    tokens: list[int]


class DetokenizeRequest(LenientModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "math", "tokens": [1, 42, 7]}]})

    model: str | None = Field(None, description="Any served model (all share one tokenizer).")
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """GET /tokenizer_info: the tokenizer's class and special tokens (no file paths)."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str


# ---------------------------------------------------------------- errors, operations, compositions


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(None, description="The request field at fault, dotted (e.g. 'composition.rank').")
    code: str = Field(description="loramix's error code (see the error catalogue in docs).")


class ErrorResponse(BaseModel):
    """OpenAI's error envelope; every non-2xx answer of the server has this body."""

    error: ErrorDetail


class HealthResponse(BaseModel):
    """`status` alone for callers without the API key (when one is configured)."""

    status: Literal["ok"] = "ok"
    model: str | None = None
    skills: list[str] | None = None
    unusable_skills: dict[str, str] | None = None  # skill -> why it cannot be served
    engine: dict[str, Any] | None = None


class SkillSource(BaseModel):
    skill: str
    weight: float
    digest: str
    rank: int


class CompositionObject(BaseModel):
    """A named or cached composition: its spec and, once merged, the merge facts."""

    id: str
    object: Literal["composition"] = "composition"
    name: str | None
    key: str | None = Field(description="Content key; null when a skill it uses no longer exists.")
    usable: bool = True
    unusable_reason: str | None = None
    model: str
    method: str
    options: dict[str, Any]
    requested_rank: int | None
    skills: list[SkillWeight]
    module_weights: dict[str, Any] | None
    cached: Literal["memory", "disk"] | None = Field(description="Cache tier of the merged adapter, null if evicted.")
    rank: int | None
    merge_seconds: float | None
    relative_error: float | None
    compressed: bool | None
    rank_before_compression: int | None
    compression_relative_error: float | None
    num_bytes: int | None
    sources: list[SkillSource] | None
    created: int | None


class CompositionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CompositionObject]


class CompositionDeleted(BaseModel):
    id: str
    object: Literal["composition"] = "composition"
    deleted: bool
