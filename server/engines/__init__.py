"""Inference engines behind the composition service, and the factory that picks one."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.engines.base import Engine
    from server.settings import Settings


def _vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine_name(engine: str) -> str:
    """`auto` becomes `vllm` when vLLM is importable, else `local`."""
    if engine == "auto":
        return "vllm" if _vllm_importable() else "local"
    return engine


def create_engine(settings: "Settings", model_dir: Path | None = None) -> "Engine":
    """Build (not start) the engine `settings.engine` names for the base model in `model_dir`
    (default: settings.base_model)."""
    model_dir = Path(model_dir or settings.base_model)
    name = resolve_engine_name(settings.engine)
    if name == "vllm":
        from server.engines.vllm import VllmEngine

        return VllmEngine(model_dir, settings.vllm)
    from server.engines.local import LocalEngine

    return LocalEngine(model_dir, settings.local)
