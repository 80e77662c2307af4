"""Per-step LoRA metadata in fixed buffers, for engines that capture CUDA graphs.

An engine knows the token -> slot mapping of a step before its forward pass, but a captured
graph replays the launches of its padded batch size with the addresses it saw at capture.
StepMeta keeps one LoraBatchMeta sized for the engine's largest batch; `update` refills it
in place (tokens past the step's own are slot -1), and `for_tokens(n)` hands a layer the
prefix meta of its padded batch size n, cached per n, so every step and every graph reads
the same tensors and the plans kept in each prefix (triton_ops) stay valid.

The refill is computed on the host when the slot ids are host data (what an engine has: vLLM
keeps its LoRA mapping as Python lists): the tensors the kernels read are views of one packed
device buffer, mirrored by a host buffer (pinned, two of them taking turns on CUDA; on CPU the
buffer is its own mirror), and one step writes only the head its tokens reach, then issues one
copy; a step with the same slot ids as the last one (decode steps of the same requests)
sends nothing. Building them on the device instead (build_meta) costs ~60 small launches per
step, which the first H200 serving run paid on every decode step, base-model steps included.
Device slot ids take that path still.
Entries past a step's tiles are the same as build_meta's where the kernels read them (slot -1,
token -1); the unused tiles' start positions are 0 (build_meta's are never read).
"""

from __future__ import annotations

import itertools
from array import array

import numpy as np
import torch

from kernels.meta import (
    RECORD_EXTRA,
    LoraBatchMeta,
    LoraBatchMetaPrefix,
    build_meta,
    prefix_meta,
)

_FIELDS = ("slot_ids", "sorted_tokens", "slot_start", "slot_len", "slot_end")


class StepMeta:
    """Token -> slot metadata of the current step, at fixed addresses."""

    def __init__(self, max_num_tokens: int, num_slots: int, device: torch.device | str):
        self.max_num_tokens = max_num_tokens
        self.num_slots = num_slots
        self.num_tokens = 0  # tokens of the current step (the rest are slot -1)
        self.meta: LoraBatchMeta = build_meta(
            torch.full((max_num_tokens,), -1, dtype=torch.int32, device=device), num_slots,
            check=False)
        self._prefixes: dict[int, LoraBatchMetaPrefix] = {}
        self._pack()

    def _entries(self) -> list[tuple[object, torch.Tensor]]:
        """(key, tensor) of every tensor the kernels read, in packing order."""
        meta = self.meta
        out = [(name, getattr(meta, name)) for name in _FIELDS]
        for block_m in sorted(meta.tiles):
            out += [(("tile_slot", block_m), meta.tiles[block_m][0]),
                    (("tile_start", block_m), meta.tiles[block_m][1])]
        out += [(("records", block_m), meta.records[block_m]) for block_m in sorted(meta.records)]
        return out

    def _pack(self) -> None:
        """Make the meta's tensors views of one device buffer and its host mirror (before any
        prefix, plan or graph has seen their addresses)."""
        entries = self._entries()
        device = self.meta.device
        total = sum(t.numel() for _, t in entries)
        self._packed = torch.empty(total, dtype=torch.int32, device=device)
        if device.type == "cuda":  # two pinned mirrors, each copied over while the other fills
            self._host = [torch.empty(total, dtype=torch.int32, pin_memory=True) for _ in range(2)]
        else:  # host memory already: the buffer is its own mirror, nothing to copy
            self._host = [self._packed]
        self._events: list[torch.cuda.Event | None] = [None] * len(self._host)
        self._turn = 0
        self._offsets: dict[object, tuple[int, tuple[int, ...]]] = {}
        offset, views = 0, {}
        for key, tensor in entries:
            view = self._packed[offset:offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            views[key] = view
            self._offsets[key] = (offset, tuple(tensor.shape))
            offset += tensor.numel()
        for host in self._host:
            if host is not self._packed:
                host.copy_(self._packed.cpu())
        meta = self.meta
        for name in _FIELDS:
            setattr(meta, name, views[name])
        meta.tiles = {b: (views[("tile_slot", b)], views[("tile_start", b)]) for b in meta.tiles}
        meta.records = {b: views[("records", b)] for b in meta.records}
        # per mirror, its arrays (numpy views) and how far the last step it carried wrote
        self._arrays = [{key: host.numpy()[off:off + int(np.prod(shape))].reshape(shape)
                         for key, (off, shape) in self._offsets.items()} for host in self._host]
        self._heads = [dict.fromkeys(self._offsets, 0) for _ in self._host]
        self._last: np.ndarray | None = None  # the slot ids the buffer holds, if host-grouped
        self._packed_block_ms = (len(meta.tiles), len(meta.records))
        self._block_ms = sorted({key[1] for key in self._offsets if isinstance(key, tuple)})

    def update(self, slot_ids) -> None:
        """Refill for a step's slot ids ([num_tokens], -1 = no adapter). No host sync: host
        data (list, numpy, CPU tensor) is grouped on the host and copied in one transfer; a
        device tensor is grouped on the device (build_meta)."""
        if isinstance(slot_ids, torch.Tensor) and slot_ids.device.type != "cpu":
            self._update_on_device(slot_ids)
            return
        ids = (slot_ids.numpy() if isinstance(slot_ids, torch.Tensor) else np.asarray(slot_ids))
        ids = ids.astype(np.int32, copy=False).reshape(-1)
        self._check(ids.size)
        if ids.size and (ids.min() < -1 or ids.max() >= self.num_slots):
            raise ValueError(f"slot ids must lie in [-1, {self.num_slots}), "
                             f"got [{ids.min()}, {ids.max()}]")
        if self._extra_block_ms():
            self._update_on_device(torch.from_numpy(ids).to(self.meta.device))
            return
        if self._last is not None and np.array_equal(ids, self._last):
            return  # the buffer holds this grouping already (decode steps of the same requests)
        turn = self._turn
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # this mirror's last copy (two steps ago) is done
        self._fill(self._arrays[turn], self._heads[turn], ids)
        if self._host[turn] is not self._packed:
            self._packed.copy_(self._host[turn], non_blocking=True)
        if len(self._host) == 2:
            self._events[turn] = torch.cuda.Event()
            self._events[turn].record()
            self._turn = 1 - turn
        self.num_tokens = ids.size
        self._last = ids.copy()

    def _check(self, num_tokens: int) -> None:
        if num_tokens > self.max_num_tokens:
            raise ValueError(f"step has {num_tokens} tokens, buffers hold {self.max_num_tokens}")

    def _extra_block_ms(self) -> bool:
        """Tiles or records made after packing (a plan's own block_m): not in the buffer."""
        return (len(self.meta.tiles), len(self.meta.records)) != self._packed_block_ms

    def _update_on_device(self, slot_ids: torch.Tensor) -> None:
        num_tokens = slot_ids.numel()
        self._check(num_tokens)
        ids = self.meta.slot_ids
        ids[:num_tokens].copy_(slot_ids, non_blocking=True)
        ids[num_tokens:].fill_(-1)
        build_meta(ids, self.num_slots, out=self.meta, check=False)
        self.num_tokens = num_tokens
        self._last = None
        if self._host[0] is self._packed:  # the mirror was written: its heads are unknown
            self._heads[0] = {key: shape[0] for key, (_, shape) in self._offsets.items()}

    def _fill(self, arrays: dict, head: dict, ids: np.ndarray) -> None:
        """Write a step's grouping into a host mirror: each array's head up to the larger of
        this step's and the mirror's last extent (past it, the mirror holds the pattern of a
        step without tokens, as it was packed). The whole mirror is copied, so a device
        refill in between (build_meta) leaves nothing stale."""
        n = ids.size
        group = self._group_lists if n <= self.list_max_tokens else self._group_arrays
        order, slot_len, slot_start, slot_end, blocks = group(ids)
        self._write(arrays, head, "slot_ids", ids, -1)
        sorted_view = arrays["sorted_tokens"]
        old = head["sorted_tokens"]
        sorted_view[:n] = order
        if old > n:
            sorted_view[n:old] = np.arange(n, old, dtype=np.int32)
        head["sorted_tokens"] = n
        arrays["slot_start"][:] = slot_start
        arrays["slot_len"][:] = slot_len
        arrays["slot_end"][:] = slot_end
        for block_m, (tile_slot, tile_start, records) in blocks.items():
            if ("tile_slot", block_m) in self._offsets:
                self._write(arrays, head, ("tile_slot", block_m), tile_slot, -1)
                self._write(arrays, head, ("tile_start", block_m), tile_start, 0)
            if ("records", block_m) in self._offsets:
                self._write(arrays, head, ("records", block_m), records, -1)

    # A decode-sized step groups faster in plain Python lists than through numpy, whose
    # ~100 calls per step cost more than the work (364 against ~60 us for 16 tokens on the
    # CI CPU, bench/punica_host.py); a prefill-sized one faster in numpy.
    list_max_tokens = 256

    def _group_lists(self, ids: np.ndarray):
        """_group_arrays' grouping, computed with Python lists (few tokens)."""
        num_slots = self.num_slots
        buckets: list[list[int]] = [[] for _ in range(num_slots + 1)]  # slot -1 -> the last
        for token, slot in enumerate(ids.tolist()):
            buckets[slot].append(token)
        order = [token for bucket in buckets for token in bucket]
        slot_len = [len(bucket) for bucket in buckets[:num_slots]]
        slot_end = list(itertools.accumulate(slot_len))
        slot_start = [end - length for end, length in zip(slot_end, slot_len)]
        blocks = {}
        longest = max(slot_len, default=0)
        one_each = None  # a block size (ascending) at which every slot fits in one tile
        for block_m in self._block_ms:
            if one_each is not None:  # the same tiles; the records only wider
                tile_slot, tile_start, narrow = blocks[one_each]
                rows = np.full((len(tile_slot), block_m + RECORD_EXTRA), -1, dtype=np.int32)
                rows[:, :one_each] = narrow[:, :one_each]
                rows[:, block_m:] = narrow[:, one_each:]
                blocks[block_m] = (tile_slot, tile_start, rows)
                continue
            tile_slot: list[int] = []
            tile_start: list[int] = []
            tokens: list[int] = []  # each slot's tokens, padded with -1 to whole tiles
            for slot, bucket in enumerate(buckets[:num_slots]):
                if bucket:
                    count = -(-len(bucket) // block_m)
                    tile_slot += [slot] * count
                    tile_start += range(slot_start[slot], slot_start[slot] + count * block_m, block_m)
                    tokens += bucket
                    tokens += [-1] * (count * block_m - len(bucket))
            rows = np.full((len(tile_slot), block_m + RECORD_EXTRA), -1, dtype=np.int32)
            rows[:, :block_m] = np.frombuffer(array("i", tokens), dtype=np.int32).reshape(-1, block_m)
            rows[:, block_m] = tile_slot
            blocks[block_m] = (tile_slot, tile_start, rows)
            if longest <= block_m:
                one_each = block_m
        return order, slot_len, slot_start, slot_end, blocks

    def _group_arrays(self, ids: np.ndarray):
        """The step's grouping: token order by slot (slot -1 last), per-slot length, start
        and end, and per block size its tiles (slot, start) and records."""
        n, num_slots = ids.size, self.num_slots
        key = np.where(ids < 0, num_slots, ids)
        order = np.argsort(key, kind="stable").astype(np.int32)
        slot_len = np.bincount(key, minlength=num_slots + 1)[:num_slots].astype(np.int32)
        slot_end = np.cumsum(slot_len, dtype=np.int32)
        slot_start = slot_end - slot_len
        blocks = {}
        for block_m in self._block_ms:
            counts = (slot_len + block_m - 1) // block_m
            tiles = int(counts.sum())
            tile_slot = np.repeat(np.arange(num_slots, dtype=np.int32), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            tile_start = (slot_start[tile_slot] + (np.arange(tiles) - first) * block_m).astype(np.int32)
            pos = tile_start[:, None] + np.arange(block_m, dtype=np.int32)
            valid = pos < slot_end[tile_slot][:, None]
            rows = np.full((tiles, block_m + RECORD_EXTRA), -1, dtype=np.int32)
            rows[:, :block_m] = np.where(valid, order[np.minimum(pos, max(n - 1, 0))], -1)
            rows[:, block_m] = tile_slot
            blocks[block_m] = (tile_slot, tile_start, rows)
        return order, slot_len, slot_start, slot_end, blocks

    @staticmethod
    def _write(arrays: dict, head: dict, key, values: np.ndarray, empty: int) -> None:
        """values into the array's head; the rows the last write reached beyond them emptied."""
        view = arrays[key]
        count, old = len(values), head[key]
        view[:count] = values
        if old > count:
            view[count:old] = empty
        head[key] = count

    def for_tokens(self, num_tokens: int) -> LoraBatchMetaPrefix | None:
        """The meta of a layer call on num_tokens rows (the step's tokens, then padding);
        None when the rows cannot hold the step's tokens or exceed the buffers."""
        if not self.num_tokens <= num_tokens <= self.max_num_tokens:
            return None
        meta = self._prefixes.get(num_tokens)
        if meta is None:
            meta = self._prefixes[num_tokens] = prefix_meta(self.meta, num_tokens)
        return meta
