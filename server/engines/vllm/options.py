"""vLLM engine options: validated once, then turned into vLLM's AsyncEngineArgs.

The option names are vLLM's own (`--max-loras`, `--max-lora-rank`, ...), so an operator who
knows vLLM knows loramix's vLLM flags. Validation here collects every problem into one
message before vLLM is imported or started, so a bad flag fails in milliseconds, not after
a 30-second engine start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# vLLM's LoRAConfig.max_lora_rank is Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]: its
# LoRA kernels are compiled for these ranks only.
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# KV cache reserved on CPU hosts when VLLM_CPU_KVCACHE_SPACE is unset (GiB). vLLM's CPU
# backend otherwise sizes it from gpu_memory_utilization of the host's whole RAM.
DEFAULT_CPU_KVCACHE_GIB = 1
# Installs loramix's fix for vLLM's CPU LoRA ops in each worker process (see cpu_lora_fix).
CPU_LORA_FIX_EXTENSION = "server.engines.vllm.cpu_lora_fix.CpuLoraFixExtension"


@dataclass(frozen=True)
class VllmOptions:
    """The vLLM engine's settings, with vLLM's names and meanings."""

    model_dir: Path
    max_loras: int = 4
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        problems = validation_problems(self)
        if problems:
            raise ValueError("Invalid vLLM engine options: " + "; ".join(problems) + ".")


def validation_problems(options: VllmOptions) -> list[str]:
    """Every problem with `options`, as short path-free sentences (empty when valid)."""
    problems = []
    if options.max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
        allowed = ", ".join(str(rank) for rank in ALLOWED_MAX_LORA_RANKS)
        problems.append(
            f"max_lora_rank must be one of {allowed} (vLLM's supported ranks), "
            f"got {options.max_lora_rank}"
        )
    if options.max_loras < 1:
        problems.append(f"max_loras must be >= 1, got {options.max_loras}")
    if options.max_cpu_loras is not None and options.max_cpu_loras < options.max_loras:
        problems.append(
            f"max_cpu_loras ({options.max_cpu_loras}) must be >= max_loras ({options.max_loras})"
        )
    if options.tensor_parallel_size < 1:
        problems.append(f"tensor_parallel_size must be >= 1, got {options.tensor_parallel_size}")
    if not 0.0 < options.gpu_memory_utilization <= 1.0:
        problems.append(
            f"gpu_memory_utilization must be in (0, 1], got {options.gpu_memory_utilization}"
        )
    if options.max_model_len is not None and options.max_model_len < 1:
        problems.append(f"max_model_len must be >= 1, got {options.max_model_len}")
    if options.dtype not in DTYPES:
        problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {options.dtype!r}")
    return problems


def engine_args_kwargs(options: VllmOptions, *, is_cpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.AsyncEngineArgs that serve `options` with LoRA enabled.

    Stats logging stays on: it is what registers vLLM's Prometheus metric families
    (vllm:...) in prometheus_client's default registry, next to loramix's own.
    """
    kwargs: dict[str, Any] = dict(
        model=str(options.model_dir),
        tokenizer=str(options.model_dir),
        enable_lora=True,
        max_loras=options.max_loras,
        max_lora_rank=options.max_lora_rank,
        max_cpu_loras=options.max_cpu_loras,
        tensor_parallel_size=options.tensor_parallel_size,
        gpu_memory_utilization=options.gpu_memory_utilization,
        max_model_len=options.max_model_len,
        dtype=options.dtype,
        enforce_eager=options.enforce_eager,
        disable_log_stats=False,
    )
    if is_cpu:
        kwargs["worker_extension_cls"] = CPU_LORA_FIX_EXTENSION
    if is_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # An explicit KV cache size also skips the CPU worker's check that
        # gpu_memory_utilization x total RAM is free, which fails on shared hosts.
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KVCACHE_GIB * 2**30
    return kwargs
