"""Tests that need an optional component (vLLM, Triton, deploy's validation tools) skip where it
is missing, or fail when LORAMIX_REQUIRE_ALL=1 (CI), so a missing component never passes
silently. Every such test goes through `missing` or `require_module`."""

from __future__ import annotations

import importlib.util
import os
from typing import NoReturn

import pytest


def require_all() -> bool:
    """Whether every optional component must be present (LORAMIX_REQUIRE_ALL=1, set by CI)."""
    return os.environ.get("LORAMIX_REQUIRE_ALL") == "1"


def missing(message: str, *, module_level: bool = False) -> NoReturn:
    """Skip because of what `message` says is missing, or fail under LORAMIX_REQUIRE_ALL=1."""
    if require_all():
        pytest.fail(f"{message} but LORAMIX_REQUIRE_ALL=1")
    pytest.skip(message, allow_module_level=module_level)


def require_module(name: str, *, module_level: bool = False) -> None:
    """`missing` unless the module `name` is installed (found, not imported)."""
    if importlib.util.find_spec(name) is None:
        missing(f"{name} is not installed", module_level=module_level)
