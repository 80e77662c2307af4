"""The cache's build function: merge a composition's skills into one adapter the engine can
serve, save it as PEFT and describe it (CompositionInfo). Runs in a merge pool worker."""

from __future__ import annotations

import time
from pathlib import Path

import merging

from server import metrics
from server.composition import CompositionSpec
from server.composition_info import CompositionInfo, SourceSkill
from server.errors import LoramixError
from server.skills import SkillRegistry


class CompositionBuilder:
    """Merges specs with the skills of `registry`, compressing results above `max_lora_rank`
    (or, with `strict_rank`, refusing them)."""

    def __init__(self, registry: SkillRegistry, *, max_lora_rank: int, strict_rank: bool) -> None:
        self.registry = registry
        self.max_lora_rank = max_lora_rank
        self.strict_rank = strict_rank

    def build(self, spec: CompositionSpec, out_dir: Path) -> tuple[merging.LoraAdapter, CompositionInfo]:
        """Merge `spec`, compress it to the engine's max rank if needed, save it into `out_dir`."""
        started = time.perf_counter()
        skills = [self.registry.get(name) for name in spec.skill_names]
        adapters = [merging.load_adapter(skill.path, name=skill.name) for skill in skills]
        result = merging.merge(
            adapters, spec.weights, method=spec.method, rank=spec.rank,
            names=spec.skill_names, options=dict(spec.options),
            module_weights={module: list(row) for module, row in spec.module_weights},
        )
        adapter, compression = self._fit_rank(result.adapter)
        adapter.save(out_dir)
        seconds = time.perf_counter() - started
        metrics.MERGES.labels(method=spec.method).inc()
        metrics.MERGE_SECONDS.labels(method=spec.method).observe(seconds)
        merged = result.info
        return adapter, CompositionInfo(
            model=spec.model_string(), spec=spec.canonical_json(), method=merged["method"],
            options=merged["options"], weights=tuple(merged["weights"]),
            num_module_weights=merged["module_weights"], num_modules=merged["num_modules"],
            rank=adapter.max_rank, num_bytes=adapter.num_bytes, exact=merged["exact"],
            relative_error=merged["relative_error"], compression_error=merged.get("compression_error"),
            seconds=merged["seconds"], merge_seconds=seconds,
            sources=tuple(SourceSkill(s.name, w, s.digest, s.rank) for s, w in zip(skills, spec.weights)),
            **compression,
        )

    def _fit_rank(self, adapter: merging.LoraAdapter) -> tuple[merging.LoraAdapter, dict]:
        """`adapter` lowered to the engine's max rank if above it, and the info fields saying so."""
        if adapter.max_rank <= self.max_lora_rank:
            return adapter, {"compressed": False}
        if self.strict_rank:
            raise rank_limit_exceeded(adapter.max_rank, self.max_lora_rank, "model")
        compressed = merging.compress(adapter, self.max_lora_rank)
        metrics.COMPRESSIONS.inc()
        return compressed.adapter, {
            "compressed": True,
            "rank_before_compression": compressed.info["original_rank"],
            "compression_relative_error": compressed.info["relative_error"],
        }


def rank_limit_exceeded(rank: int, max_rank: int, param: str | None) -> LoramixError:
    return LoramixError(
        400,
        "rank_limit_exceeded",
        f"The composition's rank {rank} exceeds the engine's maximum LoRA rank {max_rank} "
        "(strict rank mode: ask for a lower `rank` with svd or lego).",
        param=param,
    )
