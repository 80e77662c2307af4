"""The one owner of adapter registration with the engine: the cache calls `register` when a
merged adapter enters its memory tier and `unregister` when it leaves; nothing else adds or
removes adapters. Engines only look adapters up by the handles this module gives out."""

from __future__ import annotations

from server import metrics
from server.adapter_names import AdapterNames
from server.cache import CachedComposition
from server.engines.base import AdapterHandle, Engine

MAX_ADAPTER_ID = 2**31 - 1  # vLLM keeps lora_int_id in int32 arrays on its GPU runner


def adapter_id_for(key: str) -> int:
    """The preferred engine id (vLLM's lora_int_id) of composition `key`: a positive int32
    from the key's first 31 bits, the same on every replica."""
    return (int(key[:8], 16) & MAX_ADAPTER_ID) or 1


class AdapterIds:
    """Engine ids of the compositions registered in this process. Each key gets its
    preferred id unless another registered key holds it (two keys share 31 bits: about one
    pair in 2^31); then the next free id. An id is never shared by two live keys, so an
    engine never serves one composition's adapter for another."""

    def __init__(self) -> None:
        self._by_key: dict[str, int] = {}
        self._by_id: dict[int, str] = {}

    def id_for(self, key: str) -> int:
        if key in self._by_key:
            return self._by_key[key]
        adapter_id = adapter_id_for(key)
        while adapter_id in self._by_id:
            adapter_id = adapter_id % MAX_ADAPTER_ID + 1
        self._by_key[key], self._by_id[adapter_id] = adapter_id, key
        return adapter_id

    def release(self, key: str) -> int | None:
        """Forget `key`; its id (returned) may go to another key from now on."""
        adapter_id = self._by_key.pop(key, None)
        if adapter_id is not None:
            del self._by_id[adapter_id]
        return adapter_id


class EngineAdapters:
    """The cached compositions the engine knows, by engine id and name."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids = AdapterIds()
        self.names = AdapterNames()

    def handle(self, entry: CachedComposition) -> AdapterHandle:
        """The engine's handle of a cached composition."""
        adapter_id = self.ids.id_for(entry.key)
        # Every merge records the canonical model string; an entry without one (written by an
        # older loramix) is named by its key.
        name = self.names.name_for(entry.key, entry.info.model or entry.key)
        return AdapterHandle(adapter_id=adapter_id, name=name, path=entry.path, rank=entry.rank)

    async def register(self, entry: CachedComposition) -> None:
        """The cache admitted `entry`: make it usable by the engine (the cache drops it if this fails)."""
        await self.engine.add_adapter(self.handle(entry))
        metrics.ENGINE_ADAPTER_LOADS.inc()

    async def unregister(self, entry: CachedComposition) -> None:
        """The cache evicted `entry`: the engine forgets it; its id and name are free again."""
        adapter_id = self.ids.release(entry.key)
        self.names.release(entry.key)
        if adapter_id is not None:
            await self.engine.remove_adapter(adapter_id)
        metrics.ENGINE_ADAPTER_REMOVALS.inc()
