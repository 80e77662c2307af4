"""Per-batch LoRA metadata: tokens grouped by adapter slot, built once, reused by every layer.

All tensors have sizes fixed by (num_tokens, num_slots), so an engine that captures CUDA graphs
can keep one LoraBatchMeta per batch size and refill it in place (`build_meta(..., out=meta)`).
Nothing here synchronises with the device except the optional range check of `slot_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoraBatchMeta:
    """Token -> slot grouping of one batch.

    slot_ids:        [num_tokens] int32, -1 = no adapter
    sorted_tokens:   [num_tokens] int32, token indices sorted by slot (tokens with -1 last)
    slot_start:      [num_slots] int32, first position of each slot in sorted_tokens
    slot_len:        [num_slots] int32, number of tokens of each slot (0 = empty slot)
    slot_end:        [num_slots] int32, slot_start + slot_len
    tiles:           block_m -> (tile_slot [max_tiles], tile_start [max_tiles]) int32:
                     one entry per block of <= block_m tokens of one slot (positions
                     [tile_start, min(tile_start + block_m, slot_end[slot])) of
                     sorted_tokens), slot -1 = unused entry
    records:         block_m -> [max_tiles, block_m + RECORD_EXTRA] int32: per tile its token
                     indices (-1 = none) and, at column block_m, its slot (-1 = unused): a
                     tile's prologue in one round trip (Variant.records)
    counters:        [MAX_PIECES, max_tiles(block_m=16), 2] int32 zeros: the fused kernel's
                     per-tile barrier (it leaves them at zero; one stream at a time per meta)
    plans:           call signature -> triton_ops.LoraPlan (launch configs, grids, the tile
                     tensors above, one workspace per signature), filled by add_lora_planned;
                     they stay valid across in-place refills
    """

    num_tokens: int
    num_slots: int
    slot_ids: torch.Tensor
    sorted_tokens: torch.Tensor
    slot_start: torch.Tensor
    slot_len: torch.Tensor
    slot_end: torch.Tensor
    counters: torch.Tensor
    tiles: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    records: dict[int, torch.Tensor] = field(default_factory=dict)
    plans: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.slot_ids.device

    def tile_map(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tile_slot, tile_start) for blocks of block_m tokens; computed on device, cached."""
        if block_m not in self.tiles:
            self.tiles[block_m] = _tile_map(self.slot_start, self.slot_len, block_m,
                                            max_tiles(self.num_tokens, self.num_slots, block_m))
        return self.tiles[block_m]

    def tile_records(self, block_m: int) -> torch.Tensor:
        """One row per tile: token indices then slot (see class doc); on device, cached."""
        if block_m not in self.records:
            tile_slot, tile_start = self.tile_map(block_m)
            self.records[block_m] = _records(tile_slot, tile_start, self.slot_end,
                                             self.sorted_tokens, block_m)
        return self.records[block_m]


def max_tiles(num_tokens: int, num_slots: int, block_m: int) -> int:
    """Upper bound on (slot, token-block) tiles: every slot adds at most one partial block."""
    return max(1, -(-num_tokens // block_m) + min(num_slots, num_tokens))


DEFAULT_BLOCK_MS = (16, 32, 64)
MIN_BLOCK_M = 16
MAX_PIECES = 3  # output slices per launch (q/k/v)
RECORD_EXTRA = 4  # slot + padding: a record row stays a multiple of 16 bytes


def build_meta(slot_ids: torch.Tensor, num_slots: int, *, out: LoraBatchMeta | None = None,
               check: bool = True) -> LoraBatchMeta:
    """Group the tokens of a batch by adapter slot.

    slot_ids: [num_tokens] int, values in [-1, num_slots). With `out`, refill that meta's
    tensors in place (same num_tokens and num_slots): for CUDA-graph replay. `check` verifies
    the range of slot_ids (one host sync when slot_ids lives on a GPU).
    """
    # slot_ids: [num_tokens]
    _check_slot_ids(slot_ids, num_slots, check)
    ids = slot_ids.to(torch.int32)
    num_tokens = ids.numel()
    key = torch.where(ids < 0, torch.full_like(ids, num_slots), ids)
    sorted_tokens = torch.sort(key, stable=True).indices.to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, key.long(), torch.ones_like(key))
    slot_len = counts[:num_slots]
    slot_end = torch.cumsum(slot_len, 0, dtype=torch.int32)
    slot_start = slot_end - slot_len
    counters = torch.zeros(MAX_PIECES, max_tiles(num_tokens, num_slots, MIN_BLOCK_M), 2,
                           dtype=torch.int32, device=ids.device) if out is None else out.counters
    fresh = LoraBatchMeta(num_tokens, num_slots, ids, sorted_tokens, slot_start, slot_len,
                          slot_end, counters)
    for block_m in DEFAULT_BLOCK_MS:
        fresh.tile_map(block_m)
        fresh.tile_records(block_m)
    if out is None:
        return fresh
    _refill(out, fresh)
    return out


def _check_slot_ids(slot_ids: torch.Tensor, num_slots: int, check: bool) -> None:
    if not isinstance(slot_ids, torch.Tensor) or slot_ids.dim() != 1:
        raise ValueError("slot_ids must be a 1-D tensor [num_tokens]")
    if slot_ids.dtype.is_floating_point or slot_ids.dtype == torch.bool:
        raise TypeError(f"slot_ids must be an integer tensor, got {slot_ids.dtype}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if check and slot_ids.numel():
        lo, hi = int(slot_ids.min()), int(slot_ids.max())
        if lo < -1 or hi >= num_slots:
            raise ValueError(f"slot_ids must lie in [-1, {num_slots}), got [{lo}, {hi}]")


def _tile_map(slot_start: torch.Tensor, slot_len: torch.Tensor, block_m: int,
              num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    # slot_start, slot_len: [num_slots] -> tile_slot, tile_start: [num_tiles]
    blocks = (slot_len + block_m - 1) // block_m
    blocks_end = torch.cumsum(blocks, 0)
    tile = torch.arange(num_tiles, device=slot_len.device, dtype=blocks_end.dtype)
    slot = torch.searchsorted(blocks_end, tile, right=True)
    valid = slot < slot_len.numel()
    slot = slot.clamp(max=slot_len.numel() - 1)
    first_block = (blocks_end - blocks)[slot]
    tile_start = slot_start[slot] + (tile - first_block).to(torch.int32) * block_m
    tile_slot = torch.where(valid, slot, torch.full_like(slot, -1)).to(torch.int32)
    return tile_slot, tile_start.to(torch.int32)


def _records(tile_slot: torch.Tensor, tile_start: torch.Tensor, slot_end: torch.Tensor,
             sorted_tokens: torch.Tensor, block_m: int) -> torch.Tensor:
    # tile_slot, tile_start: [num_tiles] -> [num_tiles, block_m + RECORD_EXTRA]
    num_tiles = tile_slot.numel()
    rec = torch.full((num_tiles, block_m + RECORD_EXTRA), -1, dtype=torch.int32,
                     device=tile_slot.device)
    rec[:, block_m] = tile_slot
    if sorted_tokens.numel() == 0:
        return rec
    pos = tile_start[:, None] + torch.arange(block_m, dtype=torch.int32, device=rec.device)
    end = slot_end[tile_slot.clamp(min=0).long()]
    valid = (pos < end[:, None]) & (tile_slot >= 0)[:, None]
    tokens = sorted_tokens[pos.clamp(0, sorted_tokens.numel() - 1).long()]
    rec[:, :block_m] = torch.where(valid, tokens, torch.full_like(tokens, -1))
    return rec


def _refill(out: LoraBatchMeta, fresh: LoraBatchMeta) -> None:
    if (out.num_tokens, out.num_slots) != (fresh.num_tokens, fresh.num_slots):
        raise ValueError(f"out meta is for {out.num_tokens} tokens / {out.num_slots} slots, "
                         f"batch has {fresh.num_tokens} / {fresh.num_slots}")
    for name in ("slot_ids", "sorted_tokens", "slot_start", "slot_len", "slot_end"):
        getattr(out, name).copy_(getattr(fresh, name))
    for block_m in set(fresh.tiles) | set(out.tiles):  # also out's extra block_ms (plans)
        fresh_map = fresh.tile_map(block_m)
        if block_m in out.tiles:
            for dst, src in zip(out.tiles[block_m], fresh_map):
                dst.copy_(src)
        else:
            out.tiles[block_m] = fresh_map
    for block_m in set(fresh.records) | set(out.records):
        src = fresh.tile_records(block_m)
        if block_m in out.records:
            out.records[block_m].copy_(src)
        else:
            out.records[block_m] = src


@dataclass
class LoraBatchMetaPrefix(LoraBatchMeta):
    """The first num_tokens tokens of a larger meta whose other tokens all have slot -1.

    Its tensors are views of the parent's (same addresses), so refilling the parent in place
    (build_meta(..., out=parent)) refills every prefix: an engine keeps one parent sized for
    its largest batch and hands each forward pass the prefix of the batch's padded size.
    The parent's tiles are listed slot by slot with unused entries last, so the first
    max_tiles(num_tokens, ...) of them cover every token of the prefix.
    """

    parent: LoraBatchMeta | None = None

    def tile_map(self, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
        if block_m not in self.tiles:
            tile_slot, tile_start = self.parent.tile_map(block_m)
            n = max_tiles(self.num_tokens, self.num_slots, block_m)
            self.tiles[block_m] = (tile_slot[:n], tile_start[:n])
        return self.tiles[block_m]

    def tile_records(self, block_m: int) -> torch.Tensor:
        if block_m not in self.records:
            n = max_tiles(self.num_tokens, self.num_slots, block_m)
            self.records[block_m] = self.parent.tile_records(block_m)[:n]
        return self.records[block_m]


def prefix_meta(meta: LoraBatchMeta, num_tokens: int) -> LoraBatchMetaPrefix:
    """The meta of meta's first num_tokens tokens; valid while meta.slot_ids[num_tokens:] are
    all -1 (the caller's contract: no device check, so no host sync)."""
    if not 0 <= num_tokens <= meta.num_tokens:
        raise ValueError(f"prefix of {num_tokens} tokens of a meta of {meta.num_tokens}")
    return LoraBatchMetaPrefix(num_tokens, meta.num_slots, meta.slot_ids[:num_tokens],
                               meta.sorted_tokens[:num_tokens], meta.slot_start, meta.slot_len,
                               meta.slot_end, meta.counters, parent=meta)
