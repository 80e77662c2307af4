"""The composer: turns a request's `model` / `composition` into a merged adapter the engine
can serve (spec → key → cache → engine handle)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import AsyncIterator

import merging

from server import metrics
from server.cache import CachedComposition, CompositionCache
from server.composition import (
    CompositionInput,
    CompositionSpec,
    canonical_spec,
    looks_like_composition,
    spec_from_model_string,
)
from server.engine_adapters import EngineAdapters
from server.engines.base import AdapterHandle, Engine
from server.errors import LoramixError, invalid_composition
from server.merge_pool import MergePool, MergeQueueFull
from server.named import NamedCompositions
from server.skills import SkillRegistry

logger = logging.getLogger("loramix.composer")


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
        adapters: EngineAdapters,
        engine: Engine,
        named: NamedCompositions,
        default_method: str,
        merge_pool: MergePool,
    ) -> None:
        self.base_name = base_name
        self.registry = registry
        self.cache = cache  # built with this composer's `adapters` as its admit/evict hooks
        self.adapters = adapters
        self.engine = engine
        self.named = named
        self.default_method = default_method
        self.merge_pool = merge_pool
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
            yield self.adapters.handle(entry)
        finally:
            await self.cache.release(entry)

    async def acquire(self, spec: CompositionSpec) -> CachedComposition:
        """Pin the merged adapter of `spec` (merging it on a cache miss, in the merge pool's
        lane for its size). Call cache.release. A full lane is a 429 merge_queue_full."""
        key = self.key(spec)
        lane = self.merge_pool.lane_for(len(spec.skill_names))
        try:
            return await self.cache.acquire(key, spec, run=lane.run)
        except MergeQueueFull as exc:
            metrics.REJECTED_REQUESTS.labels(limit="merge_queue_size").inc()
            raise LoramixError(429, "merge_queue_full", str(exc), type="rate_limit_error") from exc
