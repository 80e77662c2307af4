"""The composer: turns a request's `model` / `composition` into a merged adapter the engine
can serve (spec → key → cache → engine.add_adapter)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import merging

from server import metrics
from server.adapter_names import AdapterNames
from server.cache import CachedComposition, CompositionCache
from server.composition import (
    CompositionInput,
    CompositionSpec,
    canonical_spec,
    looks_like_composition,
    spec_from_model_string,
)
from server.engines.base import AdapterHandle, Engine
from server.errors import LoramixError, invalid_composition
from server.merge_pool import MergePool, MergeQueueFull
from server.named import NamedCompositions
from server.skills import SkillRegistry

logger = logging.getLogger("loramix.composer")


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


@dataclass(frozen=True)
class Resolved:
    """What a request asked for: no adapter (spec None) or a composition."""

    spec: CompositionSpec | None
    model_name: str  # what the response's `model` field says


class Composer:
    """Resolves compositions and provides merged adapters, pinned for the request's lifetime."""

    def __init__(
        self,
        *,
        base_name: str,
        registry: SkillRegistry,
        cache: CompositionCache,
        engine: Engine,
        named: NamedCompositions,
        default_method: str,
        strict_rank: bool,
        merge_pool: MergePool,
    ) -> None:
        self.base_name = base_name
        self.registry = registry
        self.cache = cache
        self.engine = engine
        self.named = named
        self.default_method = default_method
        self.strict_rank = strict_rank
        self.merge_pool = merge_pool
        self.adapter_ids = AdapterIds()
        self.adapter_names = AdapterNames()
        cache.set_hooks(on_admit=self._register, on_evict=self._unregister)
        self._scan_lock = asyncio.Lock()

    # ------------------------------------------------------------------ resolution

    async def refresh_skills(self) -> None:
        """Rescan the skills directory (off the event loop) if skills were added or removed."""
        if self.registry.is_stale():
            async with self._scan_lock:
                if self.registry.is_stale():
                    await asyncio.to_thread(self.registry.scan)

    def resolve(self, model: str, composition: CompositionInput | None = None) -> Resolved:
        """The composition a request names: by `composition` field, named composition, skill
        name, composition string, or the base model (no adapter)."""
        if composition is not None:
            if model != self.base_name:
                raise invalid_composition(
                    f"With a `composition` field, `model` must be the base model '{self.base_name}'.", "model"
                )
            spec = canonical_spec(composition, default_method=self.default_method)
            self.check_skills(spec, skills_param="composition.skills", rank_param="composition.rank")
            return Resolved(spec, spec.model_string())
        if model == self.base_name:
            return Resolved(None, model)
        named = self.named.get(model)
        if named is not None:
            self._check_named(model, named)
            return Resolved(named, model)
        if not looks_like_composition(model):
            self.registry.get(model)  # a single name that is no skill: 404 model_not_found
        spec = spec_from_model_string(model, default_method=self.default_method)
        self.check_skills(spec)
        return Resolved(spec, model)

    def _check_named(self, name: str, spec: CompositionSpec) -> None:
        """A named composition whose skill vanished is unavailable (400), not an unknown model."""
        missing = [skill for skill in spec.skill_names
                   if skill not in self.registry and skill not in self.registry.problems]
        if missing:
            raise LoramixError(
                400, "skill_unavailable",
                f"The composition '{name}' cannot be served: its skill '{missing[0]}' no longer exists.",
                param="model",
            )
        self.check_skills(spec)

    def check_skills(self, spec: CompositionSpec, skills_param: str = "model", rank_param: str = "model") -> None:
        """Every skill of `spec` exists (404 model_not_found otherwise); its rank is allowed."""
        skills = []
        for name in spec.skill_names:
            if name not in self.registry and name not in self.registry.problems:
                raise LoramixError(
                    404, "model_not_found",
                    f"The skill '{name}' does not exist.", param=skills_param,
                )
            skills.append(self.registry.get(name, skills_param))
        if spec.rank is not None:
            self._check_target_rank(spec, sum(skill.rank for skill in skills), rank_param)

    def _check_target_rank(self, spec: CompositionSpec, input_rank: int, param: str) -> None:
        """A requested rank must be one the method takes, the engine serves and the inputs
        have: above the skills' total rank a merge only spends memory and time."""
        if not merging.get_method(spec.method).takes_rank:
            raise invalid_composition(
                f"Method '{spec.method}' has no target rank; use svd or lego for a rank.", param
            )
        max_rank = self.engine.max_lora_rank
        if spec.rank > max_rank:  # in any rank mode: an asked-for rank is not compressed
            raise LoramixError(
                400, "rank_limit_exceeded",
                f"The requested rank {spec.rank} exceeds the engine's maximum LoRA rank {max_rank}.",
                param=param,
            )
        if spec.rank > input_rank:
            raise invalid_composition(
                f"The requested rank {spec.rank} exceeds the skills' total rank {input_rank}; "
                "a merge has no more rank than its inputs.", param
            )

    def key(self, spec: CompositionSpec) -> str:
        digests = {name: self.registry.get(name).digest for name in spec.skill_names}
        return spec.key(digests)

    # ------------------------------------------------------------------ merged adapters

    @contextlib.asynccontextmanager
    async def adapter(self, spec: CompositionSpec | None) -> AsyncIterator[AdapterHandle | None]:
        """The engine handle of `spec`'s merged adapter, pinned in the cache while in use."""
        if spec is None:
            yield None
            return
        entry = await self.acquire(spec)
        try:
            yield self._handle(entry)
        finally:
            await self.cache.release(entry)

    async def acquire(self, spec: CompositionSpec) -> CachedComposition:
        """Pin the merged adapter of `spec` (merging it on a cache miss, in the merge pool's
        lane for its size). Call cache.release. A full lane is a 429 merge_queue_full."""
        key = self.key(spec)
        lane = self.merge_pool.lane_for(len(spec.skill_names))
        try:
            return await self.cache.acquire(key, lambda out_dir: self._build(spec, out_dir), run=lane.run)
        except MergeQueueFull as exc:
            metrics.REJECTED_REQUESTS.labels(limit="merge_queue_size").inc()
            raise LoramixError(429, "merge_queue_full", str(exc), type="rate_limit_error") from exc

    def _build(self, spec: CompositionSpec, out_dir: Path) -> tuple[merging.LoraAdapter, dict]:
        """Merge `spec` (in a merge pool worker), compress it to the engine's max rank if needed,
        save it as PEFT into `out_dir`, and describe it."""
        started = time.perf_counter()
        skills = [self.registry.get(name) for name in spec.skill_names]
        adapters = [merging.load_adapter(skill.path, name=skill.name) for skill in skills]
        result = merging.merge(
            adapters, spec.weights, method=spec.method, rank=spec.rank,
            names=spec.skill_names, options=dict(spec.options),
            module_weights={module: list(row) for module, row in spec.module_weights},
        )
        adapter, info = result.adapter, dict(result.info)
        max_rank = self.engine.max_lora_rank
        info["compressed"] = False
        if adapter.max_rank > max_rank:
            if self.strict_rank:
                raise rank_limit_exceeded(adapter.max_rank, max_rank, "model")
            compressed = merging.compress(adapter, max_rank)
            adapter = compressed.adapter
            info.update(
                compressed=True,
                rank_before_compression=compressed.info["original_rank"],
                compression_relative_error=compressed.info["relative_error"],
            )
            metrics.COMPRESSIONS.inc()
        adapter.save(out_dir)
        seconds = time.perf_counter() - started
        info.update(
            rank=adapter.max_rank,
            model=spec.model_string(),
            spec=spec.canonical_json(),
            merge_seconds=seconds,
            num_bytes=adapter.num_bytes,
            sources=[
                {"skill": s.name, "weight": w, "digest": s.digest, "rank": s.rank}
                for s, w in zip(skills, spec.weights)
            ],
        )
        metrics.MERGES.labels(method=spec.method).inc()
        metrics.MERGE_SECONDS.labels(method=spec.method).observe(seconds)
        return adapter, info

    def _handle(self, entry: CachedComposition) -> AdapterHandle:
        adapter_id = self.adapter_ids.id_for(entry.key)
        # Every merge records the canonical model string; an entry without one (written by an
        # older loramix) is named by its key.
        name = self.adapter_names.name_for(entry.key, entry.info.get("model") or entry.key)
        return AdapterHandle(adapter_id=adapter_id, name=name, path=entry.path, rank=entry.rank)

    async def _register(self, entry: CachedComposition) -> None:
        await self.engine.add_adapter(self._handle(entry))
        metrics.ENGINE_ADAPTER_LOADS.inc()

    async def _unregister(self, entry: CachedComposition) -> None:
        adapter_id = self.adapter_ids.release(entry.key)
        self.adapter_names.release(entry.key)
        if adapter_id is not None:
            await self.engine.remove_adapter(adapter_id)
        metrics.ENGINE_ADAPTER_REMOVALS.inc()


def rank_limit_exceeded(rank: int, max_rank: int, param: str | None) -> LoramixError:
    return LoramixError(
        400,
        "rank_limit_exceeded",
        f"The composition's rank {rank} exceeds the engine's maximum LoRA rank {max_rank} "
        "(strict rank mode: ask for a lower `rank` with svd or lego).",
        param=param,
    )
