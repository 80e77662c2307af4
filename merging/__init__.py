"""Pure functions on LoRA adapters: load/save (PEFT format), merge methods, registry.

    from merging import load_adapter, merge
    result = merge([load_adapter("skills/math"), load_adapter("skills/code")], method="cat")
    result.adapter.save("merged/")

This package imports nothing from the server.
"""

from merging.adapter import LoraAdapter, LoraModule, adapter_digest, load_adapter, save_adapter
from merging.errors import (
    AdapterError,
    IncompatibleAdaptersError,
    InvalidMergeOptions,
    MergeError,
    MergeFailedError,
    NonFiniteResultError,
)
from merging.merge import MergeResult, check_compatible, compress, merge
from merging.registry import MERGE_ALGORITHM_VERSION, METHODS, MethodSpec, OptionSpec, get_method, validate_options

__all__ = [
    "AdapterError",
    "IncompatibleAdaptersError",
    "InvalidMergeOptions",
    "LoraAdapter",
    "LoraModule",
    "MERGE_ALGORITHM_VERSION",
    "METHODS",
    "MergeError",
    "MergeFailedError",
    "MergeResult",
    "MethodSpec",
    "NonFiniteResultError",
    "OptionSpec",
    "adapter_digest",
    "check_compatible",
    "compress",
    "get_method",
    "load_adapter",
    "merge",
    "save_adapter",
    "validate_options",
]
