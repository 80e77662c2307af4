"""The `local` engine: transformers + batched multi-LoRA layers (kernels/), no vLLM needed."""

from server.engines.local.engine import LocalEngine
from server.engines.local.slots import AdapterRankError
from server.engines.settings import LocalSettings

__all__ = ["AdapterRankError", "LocalEngine", "LocalSettings"]
