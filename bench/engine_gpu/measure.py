"""What every timed run shares: a device sync and the median over the runs."""

from __future__ import annotations

import statistics

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summary(runs: list[dict]) -> dict:
    """Median tokens/s over the timed runs, with every run kept."""
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs), "runs": runs}
