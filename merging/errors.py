"""Errors raised by the merging library. Messages name skills and modules, never file paths."""

from __future__ import annotations


class MergeError(Exception):
    """Base class. `param` names the offending input (an option, a skill) when there is one."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterError(MergeError):
    """An adapter is malformed or uses a feature loramix does not support."""


class IncompatibleAdaptersError(MergeError):
    """Adapters that cannot be combined: different base models or module shapes."""


class InvalidMergeOptions(MergeError):
    """Unknown method or option, or an option value out of range."""


class MergeFailedError(MergeError):
    """A merge could not produce a usable adapter: non-finite values, a linear-algebra
    routine that did not converge, or an all-zero result from non-zero inputs."""


class NonFiniteResultError(MergeFailedError):
    """A merge produced NaN or infinite values."""
