"""The vLLM engine (vLLM's AsyncLLM with LoRA). Importing this package does not import vLLM;
constructing a VllmEngine without vLLM installed raises EngineError with install advice."""

from server.engines.vllm.engine import INSTALL_HINT, VllmEngine, is_vllm_available
from server.engines.settings import ALLOWED_MAX_LORA_RANKS, VllmSettings

__all__ = ["ALLOWED_MAX_LORA_RANKS", "INSTALL_HINT", "VllmEngine", "VllmSettings", "is_vllm_available"]
