"""The engines' settings, each option declared once: type, default, help text and limits.

`LocalSettings` and `VllmSettings` are what the engine constructors take. The server's
`Settings` (server/settings.py) is made of the same field groups, so every option here is
also a `loramix serve` flag and a LORAMIX_* environment variable; `Settings.local` and
`Settings.vllm` hand each engine its part. Option names are vLLM's own (`--max-loras`,
`--max-lora-rank`, ...), so an operator who knows vLLM knows loramix's flags.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# vLLM's LoRAConfig.max_lora_rank is Literal[1, 8, 16, 32, 64, 128, 256, 320, 512]: its
# LoRA kernels are compiled for these ranks only.
ALLOWED_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

Dtype = Literal["auto", "float32", "bfloat16", "float16", "float", "half"]


class EngineSettings(BaseModel):
    """What every engine is configured with."""

    max_loras: int = Field(8, ge=1, description="Adapters resident in the engine at once (slots).")
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank the engine accepts.")
    max_model_len: int | None = Field(
        None, ge=2, description="Maximum context length, prompt plus output (default: the model's)."
    )
    dtype: Dtype = Field(
        "auto", description="Model dtype: auto, float32, bfloat16, float16 (float and half: vLLM's "
        "spellings of float32 and float16; auto: float32 on the local engine, the fp32 reference, "
        "and the checkpoint's dtype on vLLM).",
    )
    enforce_eager: bool = Field(False, description="Never capture CUDA graphs (vLLM and the local engine).")


class LocalOptions(BaseModel):
    """What only the local engine has."""

    max_batch_size: int = Field(16, ge=1, description="Local engine: sequences decoded per step.")
    kv_cache: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="Local engine: KV cache layout; static (preallocated, replayed from "
        "CUDA graphs on a GPU) or dynamic (grown per step); auto = static on CUDA."
    )
    device: str | None = Field(
        None, description="Local engine: torch device (default: cuda if available, else cpu)."
    )
    engine_fused: Literal["auto", "decode"] = Field(
        "auto", description="Local engine, Triton kernels: auto (the kernel-time rule picks "
        "fused or shrink+expand) or decode (one fused launch per layer up to 64 tokens, which "
        "wins when eager decode is bound by launch overhead)."
    )


class VllmOptions(BaseModel):
    """What only the vLLM engine has."""

    max_cpu_loras: int | None = Field(None, ge=1, description="vLLM: adapters kept in CPU memory.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: tensor-parallel GPUs.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM: fraction of accelerator memory to use."
    )
    lora_kernels: Literal["vllm", "loramix"] = Field(
        "vllm", description="vLLM: whose batched LoRA kernels its layers run (loramix: ours, "
        "through loramix's vLLM plugin, vLLM's own where ours do not apply).")


class LocalSettings(EngineSettings, LocalOptions):
    """The local engine's settings (LocalEngine's constructor takes them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class VllmSettings(EngineSettings, VllmOptions):
    """The vLLM engine's settings, checked against vLLM's own limits before vLLM is imported,
    so a bad flag fails in milliseconds, not after a 30-second engine start."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="after")
    def _check_vllm_limits(self) -> VllmSettings:
        problems = []
        if self.max_lora_rank not in ALLOWED_MAX_LORA_RANKS:
            allowed = ", ".join(str(rank) for rank in ALLOWED_MAX_LORA_RANKS)
            problems.append(f"max_lora_rank must be one of {allowed} (vLLM's supported ranks), "
                            f"got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            problems.append(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        if problems:
            raise ValueError("Invalid vLLM engine options: " + "; ".join(problems) + ".")
        return self
