"""`loramix merge`: merge PEFT adapter directories into a new PEFT directory.

The typer command lives in server/cli.py; this module holds the logic so that it is usable and
testable without the server.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from merging.adapter import load_adapter
from merging.errors import InvalidMergeOptions
from merging.merge import MergeResult, merge


def parse_option_pairs(pairs: Sequence[str]) -> dict:
    """["density=0.3", "features=raw"] -> {"density": 0.3, "features": "raw"} (JSON scalars, else strings)."""
    options = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidMergeOptions(f"option {pair!r} is not key=value", param="option")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def merge_command(
    adapter_dirs: Sequence[Path],
    output: Path,
    *,
    method: str = "cat",
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    options: dict | None = None,
    show_progress: bool = True,
) -> MergeResult:
    """Load, merge and save; the output directory appears whole or not at all."""
    adapters = [load_adapter(d) for d in adapter_dirs]
    num_modules = len({m for a in adapters for m in a.modules})
    with tqdm(total=num_modules, desc=f"merge ({method})", unit="module", disable=not show_progress) as bar:
        result = merge(
            adapters, weights, method, rank,
            names=[Path(d).name for d in adapter_dirs], options=options, progress=lambda _: bar.update(1),
        )
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".merge-", dir=output.parent))
    try:
        result.adapter.save(staging)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def summary_line(result: MergeResult) -> str:
    info = result.info
    error = "exact" if info["exact"] else f"relative ΔW error {info['relative_error']:.4f}"
    if "compression_error" in info:
        error += f" (rank-k compression {info['compression_error']:.4f})"
    return (
        f"merged {info['num_modules']} modules with {info['method']} → rank {info['rank']} "
        f"in {info['seconds']:.2f} s; {error}"
    )
