"""What differs between the vLLM versions the engine supports (0.26 … 0.33), in one place.

The engine calls vLLM's public API only (`AsyncLLM`, `AsyncEngineArgs`, `LoRARequest`,
`SamplingParams`, `TokensPrompt`) and asks here for anything that moved between versions,
by feature detection, never by version number and never by importing an exception class
that one version lacks. `tests/test_vllm_surface.py` checks every vLLM name the engine
touches against the recorded surface of the oldest supported version.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

OLDEST_SUPPORTED = "0.26.0"

# vLLM's own exception classes for errors the *request* caused. 0.32 has VLLMClientError as
# their base (not a ValueError); 0.26 has VLLMValidationError(ValueError) and raises plain
# ValueError/TypeError for bad input. Matched by class name so no version-specific import
# is needed.
_CLIENT_ERROR_CLASSES = frozenset(
    {"VLLMClientError", "VLLMValidationError", "VLLMNotFoundError", "VLLMUnprocessableEntityError"}
)


def is_client_error(exc: BaseException) -> bool:
    """Whether vLLM raised `exc` because of the request (a 4xx), on any supported version."""
    if isinstance(exc, (ValueError, TypeError)):
        return True
    return any(cls.__name__ in _CLIENT_ERROR_CLASSES for cls in type(exc).__mro__)


def client_error_param(exc: BaseException) -> str | None:
    """The request field vLLM blamed (VLLMValidationError.parameter), if it named one."""
    param = getattr(exc, "parameter", None)
    return param if isinstance(param, str) and param.isidentifier() else None


def num_unfinished_requests(llm: Any) -> int | None:
    """Requests vLLM has not finished (running or queued), or None if this vLLM cannot say.

    AsyncLLM.get_num_unfinished_requests exists from 0.32; before, the output processor
    holds the same count."""
    method = getattr(llm, "get_num_unfinished_requests", None)
    if method is None:
        method = getattr(getattr(llm, "output_processor", None), "get_num_unfinished_requests", None)
    return int(method()) if callable(method) else None


def gpu_sync_allowed():
    """vLLM's `gpu_sync_allowed()` context (0.32 and later: lets code sync with the GPU under
    vLLM's sync-debug mode), or a context that does nothing where vLLM has none (0.26)."""
    try:
        module = importlib.import_module("vllm.utils.gpu_sync_debug")
    except ImportError:
        return contextlib.nullcontext()
    return module.gpu_sync_allowed()
