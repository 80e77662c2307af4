"""Adapter slots: which adapter lives in which preallocated slot, with LRU eviction.

An adapter in use by a running request is pinned (reference count > 0) and never evicted;
when every slot is pinned a request waits. Bookkeeping is guarded by a lock because the event
loop (add/remove) and the model worker thread (acquire/release) both touch it; writing factors
into the layers happens only on the worker thread, between forward passes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import merging
from server.engines.base import AdapterHandle, EngineError
from server.engines.local.lora_layers import MultiLoraLinear


class AdapterRankError(EngineError):
    """An adapter's rank exceeds the engine's max_lora_rank."""


def check_rank(name: str, rank: int, max_lora_rank: int) -> None:
    """Raise AdapterRankError if `rank` exceeds the engine's limit."""
    if rank > max_lora_rank:
        raise AdapterRankError(
            f"Adapter '{name}' has rank {rank}, above the engine's max_lora_rank "
            f"{max_lora_rank}.")


def validate_adapter(adapter: merging.LoraAdapter, handle: AdapterHandle,
                     layers: dict[str, MultiLoraLinear], max_lora_rank: int) -> None:
    """Check that every module of `adapter` fits a LoRA layer of the model; one error lists
    every problem. Messages name the adapter, never its path."""
    check_rank(handle.name, adapter.max_rank, max_lora_rank)
    problems = []
    for module, lora in adapter.modules.items():
        layer = layers.get(module)
        if layer is None:
            problems.append(f"module '{module}' is not a LoRA target of this model")
        elif (lora.in_features, lora.out_features) != (layer.in_features, layer.out_features):
            problems.append(f"module '{module}' is {lora.out_features}x{lora.in_features}, "
                            f"the model's is {layer.out_features}x{layer.in_features}")
    if problems:
        raise EngineError(f"Adapter '{handle.name}' does not fit the base model: "
                          + "; ".join(problems) + ".")


def load_checked(handle: AdapterHandle, layers: dict[str, MultiLoraLinear],
                 max_lora_rank: int) -> merging.LoraAdapter:
    """Read the PEFT directory of `handle` and validate it against the model."""
    try:
        adapter = merging.load_adapter(handle.path, name=handle.name)
    except merging.AdapterError as exc:
        raise EngineError(str(exc)) from None
    validate_adapter(adapter, handle, layers, max_lora_rank)
    return adapter


class AdapterSlots:
    """max_loras slots over the model's MultiLoraLinear layers, LRU-evicted, pinned while used."""

    def __init__(self, layers: dict[str, MultiLoraLinear], max_loras: int,
                 max_lora_rank: int) -> None:
        self.layers = layers
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self._lock = threading.Lock()
        self._handles: dict[int, AdapterHandle] = {}
        self._staged: dict[int, merging.LoraAdapter] = {}  # validated, not yet in a slot
        self._resident: OrderedDict[int, int] = OrderedDict()  # adapter_id -> slot, LRU first
        self._pins: dict[int, int] = {}  # adapter_id -> running requests using it
        self._free = list(range(max_loras - 1, -1, -1))
        self.num_loads = 0

    def register(self, handle: AdapterHandle, adapter: merging.LoraAdapter | None) -> None:
        """Remember `handle` (and its already-validated factors, loaded on first use)."""
        with self._lock:
            self._handles[handle.adapter_id] = handle
            if adapter is not None and handle.adapter_id not in self._resident:
                self._staged[handle.adapter_id] = adapter

    def is_registered(self, adapter_id: int) -> bool:
        return adapter_id in self._handles

    def forget(self, adapter_id: int) -> None:
        """Drop an adapter; its slot is freed now, or when its last running request ends."""
        with self._lock:
            self._handles.pop(adapter_id, None)
            self._staged.pop(adapter_id, None)
            if self._pins.get(adapter_id, 0) == 0 and adapter_id in self._resident:
                self._free.append(self._resident.pop(adapter_id))

    def acquire(self, handle: AdapterHandle) -> int | None:
        """Pin `handle`'s adapter in a slot (loading it, evicting the least recently used
        unpinned adapter if needed) and return the slot; None if every slot is pinned.
        Worker thread only: it writes the slot buffers."""
        with self._lock:
            adapter_id = handle.adapter_id
            if adapter_id in self._resident:
                self._resident.move_to_end(adapter_id)
                self._pins[adapter_id] = self._pins.get(adapter_id, 0) + 1
                return self._resident[adapter_id]
            slot = self._take_slot()
            if slot is None:
                return None
            adapter = self._staged.pop(adapter_id, None)
        if adapter is None:
            try:
                adapter = load_checked(handle, self.layers, self.max_lora_rank)
            except Exception:
                with self._lock:
                    self._free.append(slot)
                raise
        self._write(slot, adapter)
        with self._lock:
            self._handles.setdefault(adapter_id, handle)  # known once it loaded (never added: now)
            self._resident[adapter_id] = slot
            self._pins[adapter_id] = self._pins.get(adapter_id, 0) + 1
            self.num_loads += 1
        return slot

    def release(self, adapter_id: int) -> None:
        """Unpin one use of the adapter; a forgotten adapter's slot is freed with its last use."""
        with self._lock:
            count = self._pins.get(adapter_id, 0) - 1
            if count > 0:
                self._pins[adapter_id] = count
                return
            self._pins.pop(adapter_id, None)
            if adapter_id not in self._handles and adapter_id in self._resident:
                self._free.append(self._resident.pop(adapter_id))

    def _take_slot(self) -> int | None:
        if self._free:
            return self._free.pop()
        for adapter_id in self._resident:  # least recently used first
            if self._pins.get(adapter_id, 0) == 0:
                return self._resident.pop(adapter_id)
        return None

    def _write(self, slot: int, adapter: merging.LoraAdapter) -> None:
        for name, layer in self.layers.items():
            lora = adapter.modules.get(name)
            if lora is None:
                layer.clear_slot(slot)
            else:
                layer.set_slot(slot, lora.lora_a, lora.lora_b, lora.scaling)

    def resident(self) -> dict[str, int]:
        """Adapter name -> slot for every adapter now in a slot."""
        with self._lock:
            return {self._handles[i].name if i in self._handles else str(i): slot
                    for i, slot in self._resident.items()}
