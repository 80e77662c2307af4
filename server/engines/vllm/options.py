"""The vLLM engine's settings (server/engines/settings.py, validated there) turned into
vLLM's AsyncEngineArgs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from server.engines.settings import VllmSettings
from server.engines.vllm import punica_plugin

# KV cache reserved on CPU hosts when VLLM_CPU_KVCACHE_SPACE is unset (GiB). vLLM's CPU
# backend otherwise sizes it from gpu_memory_utilization of the host's whole RAM.
DEFAULT_CPU_KVCACHE_GIB = 1
# Installs loramix's fix for vLLM's CPU LoRA ops in each worker process (see cpu_lora_fix).
CPU_LORA_FIX_EXTENSION = "server.engines.vllm.cpu_lora_fix.CpuLoraFixExtension"
# Answers loramix_punica_stats() in each worker (see punica); the CPU extension does too.
PUNICA_STATS_EXTENSION = "server.engines.vllm.punica_plugin.PunicaStatsExtension"
# Settings that are loramix's, not AsyncEngineArgs fields (the engine applies them itself).
LORAMIX_FIELDS = {"lora_kernels"}


def engine_args_kwargs(model_dir: Path, settings: VllmSettings, *, is_cpu: bool) -> dict[str, Any]:
    """Keyword arguments for vllm.AsyncEngineArgs that serve the model in `model_dir` with
    LoRA enabled; every field of `settings` but LORAMIX_FIELDS is an AsyncEngineArgs field of
    the same name.

    Stats logging stays on: it is what registers vLLM's Prometheus metric families
    (vllm:...) in prometheus_client's default registry, next to loramix's own.
    """
    kwargs: dict[str, Any] = dict(
        settings.model_dump(exclude=LORAMIX_FIELDS),
        model=str(model_dir),
        tokenizer=str(model_dir),
        enable_lora=True,
        disable_log_stats=False,
    )
    extra = punica_plugin.additional_config(settings.lora_kernels)
    if extra:  # its own torch.compile cache (punica_plugin.ADDITIONAL_CONFIG_KEY)
        kwargs["additional_config"] = extra
    if is_cpu:
        kwargs["worker_extension_cls"] = CPU_LORA_FIX_EXTENSION
    elif settings.lora_kernels == "loramix":
        kwargs["worker_extension_cls"] = PUNICA_STATS_EXTENSION
    if is_cpu and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        # An explicit KV cache size also skips the CPU worker's check that
        # gpu_memory_utilization x total RAM is free, which fails on shared hosts.
        kwargs["kv_cache_memory_bytes"] = DEFAULT_CPU_KVCACHE_GIB * 2**30
    return kwargs
