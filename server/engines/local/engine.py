"""LocalEngine: transformers model + multi-LoRA layers + an iteration-level batch scheduler.

The event loop never runs the model: a single worker thread does every forward pass (and the
slot writes between them), while an asyncio task feeds it waiting requests and the requests'
queues receive deltas through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

import torch

from kernels import backend_for

from server.engines.base import (AdapterHandle, Engine, EngineError, EngineRequestError,
                                 GenerationDelta, SamplingOptions)
from server.engines.local.lora_layers import (DEFAULT_TARGET_MODULES, LoraBatchContext,
                                              install_lora_layers)
from server.engines.local.runner import ModelRunner, StaticModelRunner
from server.engines.local.sequence import Sequence
from server.engines.local.slots import AdapterSlots, check_rank, load_checked
from server.engines.settings import LocalSettings

logger = logging.getLogger("loramix.engines.local")

# The settings' dtype names (vLLM's float and half included). This engine is the fp32
# reference: auto means float32 here.
_DTYPES = {"auto": torch.float32, "float32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}


class LocalEngine(Engine):
    """The embedded engine (see docs/local_engine.md), configured by LocalSettings (their
    help texts say what each option does). target_modules: names of the linear layers that
    get LoRA slots. max_model_len defaults to, and is bounded by, the model's
    max_position_embeddings."""

    name = "local"

    def __init__(self, model_dir: Path | str, settings: LocalSettings | None = None, *,
                 target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES) -> None:
        self.settings = settings = settings or LocalSettings()
        self.model_dir = Path(model_dir)
        self.max_loras = settings.max_loras
        self.device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_batch_size = settings.max_batch_size
        self.target_modules = tuple(target_modules)
        self.tokenizer = None
        self._max_model_len_option = settings.max_model_len
        self.max_model_len: int | None = None
        self.kv_cache = settings.kv_cache  # resolved to "dynamic" or "static" at start
        self.enforce_eager = settings.enforce_eager
        self.cuda_graphs = False
        self._runner: ModelRunner | None = None
        self._slots: AdapterSlots | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._waiting: list[Sequence] = []
        self._requests: dict[str, Sequence] = {}

    @property
    def max_lora_rank(self) -> int:
        return self.settings.max_lora_rank

    async def start(self) -> None:
        """Load model and tokenizer (off the event loop) and start the scheduler task."""
        if self._task is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loramix-local")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._schedule(), name="loramix-local-scheduler")

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=_DTYPES[self.settings.dtype])
        model.to(self.device).eval()
        context = LoraBatchContext(engine_fused=self.settings.engine_fused)
        layers = install_lora_layers(model, context, max_loras=self.max_loras,
                                     max_lora_rank=self.settings.max_lora_rank,
                                     target_modules=self.target_modules)
        if not layers:
            raise EngineError(f"The model has no linear layers named {self.target_modules}.")
        self._slots = AdapterSlots(layers, self.max_loras, self.settings.max_lora_rank)
        config = model.config
        limits = [n for n in (self._max_model_len_option,
                              getattr(config, "max_position_embeddings", None)) if n]
        self.max_model_len = min(limits) if limits else None
        # Checkpoints often pad the embedding beyond the tokenizer's size; both ranges are valid.
        self._vocab_size = max(len(self.tokenizer), getattr(config, "vocab_size", 0) or 0)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id or 0
        self._eos_token_ids = _eos_ids(model, self.tokenizer)
        self._runner = self._make_runner(model, context, pad)

    def _make_runner(self, model, context: LoraBatchContext, pad: int) -> ModelRunner:
        """The dynamic or static runner the options and the model allow (see the class doc)."""
        attention = getattr(model.config, "_attn_implementation", "sdpa")
        static = self.kv_cache == "static" or (self.kv_cache == "auto"
                                                and self.device.type == "cuda")
        if static and (self.max_model_len is None or attention not in ("sdpa", "eager")):
            if self.kv_cache == "static":
                raise EngineError("kv_cache='static' needs max_model_len (or the model's "
                                  "max_position_embeddings) and sdpa or eager attention.")
            static = False
        if static and self.device.type == "cuda":
            static = self._static_fits(model)
        self.kv_cache = "static" if static else "dynamic"
        if not static:
            return ModelRunner(model, context, self._slots, pad_token_id=pad, device=self.device)
        # Graphs need the Triton kernels: the torch reference groups tokens data-dependently.
        self.cuda_graphs = (self.device.type == "cuda" and not self.enforce_eager
                            and backend_for(torch.empty(0, device=self.device)) == "triton")
        return StaticModelRunner(model, context, self._slots, pad_token_id=pad,
                                 device=self.device, max_rows=self.max_batch_size,
                                 max_len=self.max_model_len, use_graphs=self.cuda_graphs)

    def _static_fits(self, model) -> bool:
        """Whether the static KV buffers fit in half the free GPU memory; `auto` falls back to
        the dynamic cache when they do not, `static` is refused with the numbers."""
        needed = static_kv_bytes(model.config, self.max_batch_size, self.max_model_len,
                                 next(model.parameters()).element_size())
        free, _ = torch.cuda.mem_get_info(self.device)
        if needed is None or needed <= free // 2:
            return True
        message = (f"The static KV cache needs {needed / 2**30:.1f} GiB for {self.max_batch_size} "
                   f"rows of {self.max_model_len} tokens, over half of the {free / 2**30:.1f} GiB "
                   "free; lower max_model_len or max_batch_size.")
        if self.kv_cache == "static":
            raise EngineError(message)
        logger.warning("%s Using the dynamic KV cache (no CUDA graphs).", message)
        return False

    async def shutdown(self) -> None:
        """Stop the scheduler, end outstanding requests with an error, free the model."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        for seq in list(self._requests.values()):
            if not seq.is_finished:
                seq.is_finished = True
                seq.emit(EngineError("The local engine was shut down."))
        self._requests.clear()
        self._waiting.clear()
        # The step in flight (if any) finishes on the worker; wait for it off the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._runner = self._slots = None

    def _require_started(self) -> AdapterSlots:
        if self._slots is None:
            raise EngineError("The local engine is not started.")
        return self._slots

    async def add_adapter(self, handle: AdapterHandle) -> None:
        """Read and validate the adapter now (off the loop); it enters a slot on first use."""
        slots = self._require_started()
        if slots.is_registered(handle.adapter_id):
            return
        check_rank(handle.name, handle.rank, self.settings.max_lora_rank)
        adapter = await asyncio.to_thread(load_checked, handle, slots.layers,
                                          self.settings.max_lora_rank)
        slots.register(handle, adapter)

    async def remove_adapter(self, adapter_id: int) -> None:
        """Forget the adapter; a slot still used by running requests is freed after them."""
        if self._slots is not None:
            self._slots.forget(adapter_id)

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingOptions,
                       adapter: AdapterHandle | None = None) -> AsyncIterator[GenerationDelta]:
        """Queue the request and stream its deltas; closing the stream early aborts it."""
        self._require_started()
        self._check_request(request_id, prompt_token_ids, sampling)
        if adapter is not None:  # registered or not, it is loaded into a slot by the worker
            check_rank(adapter.name, adapter.rank, self.settings.max_lora_rank)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seq = Sequence(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), sampling=sampling,
            adapter=adapter, emit=lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
            max_total_len=self.max_model_len or 1 << 62, tokenizer=self.tokenizer,
            eos_token_ids=self._eos_token_ids)
        self._requests[request_id] = seq
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._requests.pop(request_id, None)
            if not seq.is_finished:
                seq.is_aborted = True
                self._wake.set()

    def _check_request(self, request_id: str, prompt_token_ids: list[int],
                       sampling: SamplingOptions) -> None:
        if request_id in self._requests:
            raise EngineError(f"Request id '{request_id}' is already running.")
        if not prompt_token_ids:
            raise _bad_request("invalid_request_error", "The prompt is empty.", "prompt")
        if self.max_model_len is not None and len(prompt_token_ids) >= self.max_model_len:
            raise _bad_request(
                "context_length_exceeded",
                f"The prompt has {len(prompt_token_ids)} tokens; this model's maximum context "
                f"length is {self.max_model_len} tokens, including the output.", "prompt")
        vocab_size = self._vocab_size
        if any(not 0 <= t < vocab_size for t in prompt_token_ids):
            raise _bad_request("invalid_request_error",
                               f"Prompt token ids must lie in [0, {vocab_size}).", "prompt")
        if any(not 0 <= t < vocab_size for t in sampling.stop_token_ids):
            raise _bad_request("invalid_request_error",
                               f"Stop token ids must lie in [0, {vocab_size}).", "stop_token_ids")
        if sampling.max_tokens < 1:
            raise _bad_request("invalid_request_error", "max_tokens must be at least 1.",
                               "max_tokens")

    async def abort(self, request_id: str) -> None:
        """Stop a request: it leaves the batch (freeing its slot) and its stream ends with
        finish_reason "abort"."""
        seq = self._requests.get(request_id)
        if seq is None or seq.is_finished:
            return
        seq.is_aborted = True
        self._wake.set()  # the scheduler ends it, waiting or running

    async def _schedule(self) -> None:
        """Feed the worker: each iteration admits waiting requests up to max_batch_size and
        runs one step (prefill of the admitted + one decode token for every row)."""
        loop = asyncio.get_running_loop()
        runner = self._runner
        try:
            while True:
                if not self._waiting and not runner.rows:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._drop_aborted_waiting()
                capacity = self.max_batch_size - sum(not s.is_done for s in runner.rows)
                # Candidates stay in _waiting (health counts them) until the worker takes them.
                taken = await loop.run_in_executor(self._executor, runner.step,
                                                   self._waiting[:capacity])
                taken_ids = {id(s) for s in taken}
                self._waiting = [s for s in self._waiting if id(s) not in taken_ids]
        except Exception:
            logger.exception("local engine scheduler stopped")
            for seq in self._requests.values():
                if not seq.is_finished:
                    seq.is_finished = True
                    seq.emit(EngineError("The local engine stopped after an internal error."))
            raise

    def _drop_aborted_waiting(self) -> None:
        for seq in self._waiting:
            if seq.is_aborted and not seq.is_finished:
                seq.is_finished = True
                seq.emit_abort()
        self._waiting = [s for s in self._waiting if not s.is_aborted]

    def request_counts(self) -> tuple[int, int]:
        """(sequences in the batch, sequences waiting to be admitted)."""
        runner = self._runner
        running = sum(not s.is_done for s in runner.rows) if runner else 0
        return running, sum(not (s.is_admitted or s.is_done) for s in self._waiting)

    def lora_requests_info(self) -> tuple[list[str], list[str], int]:
        """Adapter names (canonical composition strings) of running and waiting sequences, and max_loras,
        for vLLM's `vllm:lora_requests_info` metric."""
        runner = self._runner
        rows = [s for s in runner.rows if not s.is_done] if runner else []
        waiting = [s for s in self._waiting if not (s.is_admitted or s.is_done)]
        return _adapter_names(rows), _adapter_names(waiting), self.max_loras

    def health(self) -> dict:
        """Engine name, device, resident adapters (name -> slot), running and waiting counts."""
        runner = self._runner
        num_running, num_waiting = self.request_counts()
        return {
            "engine": self.name,
            "running": self._task is not None,
            "device": str(self.device),
            "max_loras": self.max_loras,
            "max_lora_rank": self.settings.max_lora_rank,
            "max_batch_size": self.max_batch_size,
            "max_model_len": self.max_model_len,
            "kv_cache": self.kv_cache,
            "cuda_graphs": isinstance(runner, StaticModelRunner) and runner.decoder.use_graphs,
            "num_cuda_graphs": len(runner.decoder.graphs) if isinstance(
                runner, StaticModelRunner) else 0,
            "loaded_adapters": self._slots.resident() if self._slots else {},
            "adapter_loads": self._slots.num_loads if self._slots else 0,
            "num_running": num_running,
            "num_waiting": num_waiting,
            "num_forward_passes": runner.num_forward_passes if runner else 0,
            "max_adapters_per_pass": runner.max_adapters_per_pass if runner else 0,
        }


def static_kv_bytes(config, max_rows: int, max_len: int, element_size: int) -> int | None:
    """Bytes of StaticKV's key and value buffers for a decoder config (None if the config
    does not say its layer count, head count and head size)."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None)
    if not (layers and kv_heads and head_dim):
        return None
    return 2 * layers * max_rows * max_len * kv_heads * head_dim * element_size


def _adapter_names(seqs: list[Sequence]) -> list[str]:
    """The distinct adapter names of `seqs`, sorted (the base model has none)."""
    return sorted({s.adapter.name for s in seqs if s.adapter is not None})


def _bad_request(code: str, message: str, param: str) -> Exception:
    """A client error; the HTTP layer maps it to a 400 envelope."""
    return EngineRequestError(message, code=code, param=param)


def _eos_ids(model, tokenizer) -> frozenset[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
