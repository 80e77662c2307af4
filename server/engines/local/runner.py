"""The model side of the local engine: one padded batch with a shared KV cache.

Every step runs on the worker thread: drop finished rows, admit new requests (pin their
adapters in slots, prefill them together with left padding), then decode one token for every
row in a single forward pass whatever adapter each row uses. Rows join and leave at any step
(iteration-level batching): the KV caches of the running batch and of newly prefilled rows
are left-padded to a common length and concatenated; the attention mask hides the padding and
each row keeps its own position ids, so a row's tokens do not depend on its neighbours.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from server.engines.base import EngineError, TokenLogprobs
from server.engines.local.logprobs import position_logprobs, prompt_logprobs
from server.engines.local.lora_layers import LoraBatchContext
from server.engines.local.sampling import sample_rows
from server.engines.local.sequence import Sequence
from server.engines.local.slots import AdapterSlots
from server.engines.local.static_decode import StaticDecoder
from server.engines.local.static_kv import StaticKV

logger = logging.getLogger("loramix.engines.local")


def _cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Pad `t` with zeros at the front of `dim` up to `length`."""
    missing = length - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _sampled_logprobs(seq: Sequence, logits: torch.Tensor, token: int) -> list[TokenLogprobs] | None:
    """The sampled token's logprobs for a sequence that asked for them. logits: [vocab]"""
    num_top = seq.sampling.logprobs
    if num_top is None:
        return None
    return position_logprobs(logits.unsqueeze(0), [token], num_top)


class ModelRunner:
    """Owns the model's running batch: rows (Sequences), KV cache [rows, heads, L, head_dim]
    and attention mask [rows, L]."""

    def __init__(self, model, context: LoraBatchContext, slots: AdapterSlots, *,
                 pad_token_id: int, device: torch.device) -> None:
        self.model = model
        self.context = context
        self.slots = slots
        self.pad_token_id = pad_token_id
        self.device = device
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, L] int64, 1 = real token
        self.num_forward_passes = 0
        self.max_adapters_per_pass = 0  # distinct slots (base model counted) in one pass

    @torch.inference_mode()
    def step(self, candidates: list[Sequence]) -> list[Sequence]:
        """One scheduler iteration; returns the candidates it took (admitted or failed);
        the others found no free slot and keep waiting."""
        try:
            self._drop_done()
            admitted, waiting = self._pin_adapters(candidates)
            for seq in admitted:
                seq.is_admitted = True
            if admitted:
                self._prefill(admitted)
                self._drop_done()
            if self.rows:
                self._decode()
            return [s for s in candidates if s not in waiting]
        except Exception as exc:
            logger.exception("local engine step failed")
            self._fail_all(candidates, exc)
            return list(candidates)

    def _pin_adapters(self, admit: list[Sequence]) -> tuple[list[Sequence], list[Sequence]]:
        admitted, waiting = [], []
        for seq in admit:
            if seq.adapter is None:
                admitted.append(seq)
                continue
            try:
                slot = self.slots.acquire(seq.adapter)
            except EngineError as exc:
                seq.is_finished = True
                seq.emit(exc)
                continue
            if slot is None:
                waiting.append(seq)
            else:
                seq.slot = slot
                admitted.append(seq)
        return admitted, waiting

    def _forward(self, input_ids, attention_mask, position_ids, cache, rows,
                 all_positions: bool = False) -> torch.Tensor:
        """Run the model; returns the last position's logits [rows, vocab] as float32 on CPU,
        or with all_positions the logits of every input position [rows, L, vocab] as they are."""
        row_slots = [s.slot for s in rows]
        self.context.set_slots(row_slots, input_ids.shape[1], self.slots.max_loras, self.device)
        self.num_forward_passes += 1
        self.max_adapters_per_pass = max(self.max_adapters_per_pass, len(set(row_slots)))
        length = attention_mask.shape[1]
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=0 if all_positions else 1,
                cache_position=torch.arange(length - input_ids.shape[1], length,
                                            device=self.device))
        finally:
            self.context.clear()
        if all_positions:
            return out.logits
        return out.logits[:, -1, :].float().cpu()

    def _prefill(self, seqs: list[Sequence]) -> None:
        length = max(s.num_prompt_tokens for s in seqs)
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, seq in enumerate(seqs):
            input_ids[i, length - seq.num_prompt_tokens:] = torch.tensor(seq.prompt_token_ids)
            mask[i, length - seq.num_prompt_tokens:] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache()
        echo = any(seq.sampling.prompt_logprobs is not None for seq in seqs)
        logits = self._forward(input_ids, mask, position_ids, cache, seqs, all_positions=echo)
        if echo:  # [rows, length, vocab]: the prompt's logprobs, then the last position's logits
            for i, seq in enumerate(seqs):
                if seq.sampling.prompt_logprobs is not None:
                    seq.prompt_logprobs = prompt_logprobs(
                        logits[i, length - seq.num_prompt_tokens:], seq.prompt_token_ids,
                        seq.sampling.prompt_logprobs)
            logits = logits[:, -1, :].float().cpu()
        self._join(seqs, cache, mask)
        self._sample(seqs, logits)

    def _decode(self) -> None:
        rows = self.rows
        input_ids = torch.tensor([[s.output_token_ids[-1]] for s in rows], device=self.device)
        position_ids = torch.tensor([[s.next_position] for s in rows], device=self.device)
        ones = torch.ones((len(rows), 1), dtype=torch.long, device=self.device)
        mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(input_ids, mask, position_ids, self.cache, rows)
        self.mask = mask
        self._sample(rows, logits)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        # logits: [len(seqs), vocab] float32 on CPU
        live = [i for i, seq in enumerate(seqs) if not seq.is_done]
        seqs = [seqs[i] for i in live]
        live_logits = logits[live]
        try:
            tokens = sample_rows([s.sampler for s in seqs], live_logits,
                                 [s.prompt_token_ids for s in seqs],
                                 [s.output_token_ids for s in seqs])
        except Exception as exc:  # noqa: BLE001 - a sampling bug fails these rows, not the batch
            tokens = [exc] * len(seqs)
        for row, (seq, token) in enumerate(zip(seqs, tokens)):
            try:
                if isinstance(token, BaseException):
                    raise token
                seq.append_token(token, _sampled_logprobs(seq, live_logits[row], token))
            except Exception as exc:  # noqa: BLE001 - one sequence's failure is its own
                self._fail_one(seq, exc)

    def _fail_one(self, seq: Sequence, exc: Exception) -> None:
        """End one sequence with an error; the batch goes on (rows are independent, so a
        NaN in one row's logits or KV never reaches another row). The next step drops it."""
        if not isinstance(exc, EngineError):
            logger.exception("sampling failed for request %s", seq.request_id, exc_info=exc)
            exc = EngineError(f"The local engine failed on this request: {type(exc).__name__}.")
        seq.is_finished = True
        seq.emit(exc)

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append freshly prefilled rows to the running batch (left-padding the shorter side)."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(seqs), cache, mask
            return
        length = max(self.mask.shape[1], mask.shape[1])
        layers = [
            tuple(torch.cat([_left_pad(old, length, 2), _left_pad(new, length, 2)])
                  for old, new in zip(old_kv, new_kv))
            for old_kv, new_kv in zip(_cache_layers(self.cache), _cache_layers(cache))
        ]
        self.cache = DynamicCache(layers)
        self.mask = torch.cat([_left_pad(self.mask, length, 1), _left_pad(mask, length, 1)])
        self.rows = self.rows + list(seqs)

    def _drop_done(self) -> None:
        """Remove finished and aborted rows, unpin their adapters, trim all-padding columns."""
        keep = [i for i, s in enumerate(self.rows) if not s.is_done]
        if len(keep) == len(self.rows):
            return
        for seq in self.rows:
            if seq.is_done:
                self._release(seq)
        self._keep_rows(keep)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only the rows at `keep` (ascending) in the batch and its KV cache."""
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        first = int(mask.any(dim=0).nonzero()[0])
        self.mask = mask[:, first:]
        self.cache = DynamicCache([
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in _cache_layers(self.cache)
        ])
        self.rows = [self.rows[i] for i in keep]

    def _release(self, seq: Sequence) -> None:
        if seq.is_aborted and not seq.is_finished:
            seq.emit_abort()
            seq.is_finished = True
        if seq.adapter is not None and seq.slot >= 0:
            self.slots.release(seq.adapter.adapter_id)
            seq.slot = -1

    def _fail_all(self, admit: list[Sequence], exc: Exception) -> None:
        """After a failed forward pass the batch state is unusable: end every request in it."""
        error = EngineError(f"The local engine failed: {type(exc).__name__}.")
        for seq in self.rows + admit:
            if not seq.is_finished:
                seq.is_finished = True
                seq.emit(error)
            if seq.adapter is not None and seq.slot >= 0:
                self.slots.release(seq.adapter.adapter_id)
                seq.slot = -1
        self.rows, self.cache, self.mask = [], None, None


class StaticModelRunner(ModelRunner):
    """ModelRunner whose running batch lives in a preallocated StaticKV, so decode steps
    can be replayed from CUDA graphs (static_decode.py). Prefill is unchanged: new rows are
    prefilled together into a fresh DynamicCache, then copied into the static buffers."""

    def __init__(self, model, context: LoraBatchContext, slots: AdapterSlots, *,
                 pad_token_id: int, device: torch.device, max_rows: int, max_len: int,
                 use_graphs: bool) -> None:
        super().__init__(model, context, slots, pad_token_id=pad_token_id, device=device)
        self.kv = StaticKV(max_rows, max_len, device)
        self.decoder = StaticDecoder(model, context, self.kv, num_slots=slots.max_loras,
                                     pad_token_id=pad_token_id, use_graphs=use_graphs)

    def _join(self, seqs: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        self.kv.append(_cache_layers(cache), mask, [s.num_prompt_tokens for s in seqs])
        self.rows = self.rows + list(seqs)

    def _keep_rows(self, keep: list[int]) -> None:
        self.kv.keep(keep)
        self.rows = [self.rows[i] for i in keep]

    def _decode(self) -> None:
        rows = self.rows
        row_slots = [s.slot for s in rows]
        self.num_forward_passes += 1
        self.max_adapters_per_pass = max(self.max_adapters_per_pass, len(set(row_slots)))
        logits = self.decoder.decode([s.output_token_ids[-1] for s in rows],
                                     [s.next_position for s in rows], row_slots)
        self._sample(rows, logits.cpu())

    def _fail_all(self, admit: list[Sequence], exc: Exception) -> None:
        super()._fail_all(admit, exc)
        self.kv.reset()
