"""Shared fixtures: a tiny base model and demo skill adapters, built locally once per session."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: an accidental hub access must fail fast, not hang.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Triton decides between compiling and interpreting when a kernel is decorated, i.e. when the
# first module that defines kernels is imported (kernels/, or vLLM's own). Without a GPU the
# kernel tests run under the interpreter, so it must be on before any test module is imported.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from lab.demo import DemoPaths, ensure_demo  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _hub_offline():
    """Keep the hub off for the whole session, even if a test changes the environment."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    yield


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory) -> DemoPaths:
    """The demo build (tiny base + skills math, code, poetry, lookup) in a session temp dir."""
    return ensure_demo(tmp_path_factory.mktemp("demo"), world="tiny")


@pytest.fixture(scope="session")
def tiny_base(demo_paths) -> Path:
    """Directory of the tiny random Llama model and its tokenizer."""
    return demo_paths.base_dir


@pytest.fixture(scope="session")
def skills_dir(demo_paths) -> Path:
    """Directory with one PEFT adapter sub-directory per skill (math r8, code r8,
    poetry r4 attention-only, lookup r16)."""
    return demo_paths.skills_dir
