"""Decode steps over a StaticKV, eager or replayed from CUDA graphs.

An eager decode step costs the host far more than the GPU: for a Llama-1B shape with 32 rows,
~1,000 kernel launches of a few µs each, issued through Python (bench/kernels_notes.md, runs
5–7). As vLLM does, the step is captured once per shape and replayed. A graph fixes its
shapes, addresses and launch grids, so:
- rows are padded up to a bucket (1, 2, 4, 8, then multiples of 8) and the attended columns
  up to a power of two (at least 256) or max_len: one graph per (rows, columns, LoRA on/off),
  captured the first time that shape is needed;
- inputs (token ids, positions, the column to write) are copied into one static buffer;
- the multi-LoRA layers use one LoraBatchMeta per row bucket whose tensors are refilled in
  place when the rows' slots change (the kernels' launch grids depend only on the bucket).
Without CUDA (tests, CPU serving) the same forward runs eagerly at the exact width.
"""

from __future__ import annotations

import logging

import torch

from kernels import LoraBatchMeta, backend_for, build_meta
from server.engines.local.lora_layers import LoraBatchContext
from server.engines.local.static_kv import StaticKV, StaticKVView

logger = logging.getLogger("loramix.engines.local")

MIN_GRAPH_COLUMNS = 256


def row_buckets(max_rows: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, 16, 24, ... up to max_rows (always included)."""
    sizes = [b for b in (1, 2, 4) if b < max_rows] + list(range(8, max_rows, 8))
    return sizes + [max_rows]


def column_bucket(columns: int, max_len: int) -> int:
    """Attended width of a graph: the next power of two >= columns (at least 256), or max_len."""
    width = MIN_GRAPH_COLUMNS
    while width < columns:
        width *= 2
    return min(width, max_len)


class StaticDecoder:
    """Runs one decode forward over the first rows of a StaticKV; see the module doc.

    use_graphs: capture and replay CUDA graphs (needs a CUDA device); otherwise eager."""

    def __init__(self, model, context: LoraBatchContext, kv: StaticKV, *, num_slots: int,
                 pad_token_id: int, use_graphs: bool) -> None:
        self.model, self.context, self.kv = model, context, kv
        self.num_slots, self.pad_token_id = num_slots, pad_token_id
        self.use_graphs = use_graphs
        self.buckets = row_buckets(kv.max_rows)
        rows = kv.max_rows
        # [token ids (max_rows) | positions (max_rows) | column to write (1)]
        self.inputs = torch.zeros(2 * rows + 1, dtype=torch.long, device=kv.device)
        self.is_triton = backend_for(self.inputs) == "triton"
        self.metas: dict[int, tuple[torch.Tensor, LoraBatchMeta, tuple]] = {}
        self.graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        attn = getattr(model.config, "_attn_implementation", "sdpa")
        self.additive_mask = attn == "eager"  # eager attention adds the mask; sdpa takes bools

    def decode(self, token_ids: list[int], positions: list[int],
               row_slots: list[int]) -> torch.Tensor:
        """One token for each of the first len(token_ids) rows (KV column kv.length);
        returns their last-position logits [rows, vocab] as float32 on the device."""
        num_rows = len(token_ids)
        column = self.kv.reserve_column()
        if self.use_graphs:
            rows = next(b for b in self.buckets if b >= num_rows)
            width = column_bucket(column + 1, self.kv.max_len)
        else:
            rows, width = num_rows, column + 1
        pad = rows - num_rows
        host = torch.zeros(2 * self.kv.max_rows + 1, dtype=torch.long)
        host[:rows] = torch.tensor(token_ids + [self.pad_token_id] * pad)
        host[self.kv.max_rows:self.kv.max_rows + rows] = torch.tensor(positions + [0] * pad)
        host[-1] = column
        self.inputs.copy_(host, non_blocking=True)
        padded_slots = row_slots + [-1] * pad
        is_lora = any(slot >= 0 for slot in padded_slots)
        try:
            self._set_lora(padded_slots, is_lora)
            if self.use_graphs:
                logits = self._replay(rows, width, is_lora)
            else:
                logits = self._forward(rows, width)
        finally:
            self.context.clear()
        self.kv.length = column + 1
        return logits[:num_rows]

    def _set_lora(self, padded_slots: list[int], is_lora: bool) -> None:
        if not is_lora:
            return
        if not self.is_triton:  # the torch reference groups tokens itself
            self.context.set_slots(padded_slots, 1, self.num_slots, self.kv.device)
            return
        rows = len(padded_slots)
        entry = self.metas.get(rows)
        if entry is None:
            slot_ids = torch.tensor(padded_slots, dtype=torch.int32, device=self.kv.device)
            entry = (slot_ids, build_meta(slot_ids, self.num_slots, check=False),
                     tuple(padded_slots))
            self.metas[rows] = entry
        slot_ids, meta, loaded = entry
        if loaded != tuple(padded_slots):  # refill in place: graphs hold these addresses
            slot_ids.copy_(torch.tensor(padded_slots, dtype=torch.int32), non_blocking=True)
            build_meta(slot_ids, self.num_slots, out=meta, check=False)
            self.metas[rows] = (slot_ids, meta, tuple(padded_slots))
        self.context.set_meta(meta)

    def _forward(self, rows: int, width: int) -> torch.Tensor:
        """The decode forward over rows [0, rows) and columns [0, width), reading self.inputs;
        everything it does is a GPU op on fixed addresses, so it can be captured."""
        max_rows = self.kv.max_rows
        token_ids = self.inputs[:rows].view(rows, 1)
        positions = self.inputs[max_rows:max_rows + rows].view(rows, 1)
        column = self.inputs[2 * max_rows:]
        mask = self.kv.mask[:rows]
        mask.index_fill_(1, column, True)  # this step's token (padding rows attend to it only)
        attention = mask[:, None, None, :width]
        if self.additive_mask:
            dtype = self.kv.keys[0].dtype
            attention = torch.zeros(attention.shape, dtype=dtype, device=mask.device).masked_fill(
                ~attention, torch.finfo(dtype).min)
        out = self.model(input_ids=token_ids, attention_mask=attention, position_ids=positions,
                         past_key_values=StaticKVView(self.kv, rows, width, column),
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :].float()

    def _replay(self, rows: int, width: int, is_lora: bool) -> torch.Tensor:
        key = (rows, width, is_lora)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(rows, width)
            except Exception:  # the step itself can still run: serve on, eagerly
                logger.exception("CUDA-graph capture failed (%d rows, %d columns); the local "
                                 "engine decodes eagerly from now on", rows, width)
                self.use_graphs = False
                return self._forward(rows, width)
            self.graphs[key] = entry
        graph, logits = entry
        graph.replay()
        return logits

    def _capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (Triton compiles, launch plans, cuBLAS workspaces), then
        capture. Every op of the forward is idempotent for the current inputs (it rewrites
        the same KV column and mask bit), so the warm-up runs are harmless."""
        stream = torch.cuda.Stream(self.kv.device)
        stream.wait_stream(torch.cuda.current_stream(self.kv.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(rows, width)
        torch.cuda.current_stream(self.kv.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(rows, width)
        self.pool = graph.pool()
        logger.debug("captured a decode graph: %d rows, %d columns", rows, width)
        return graph, logits
