"""Load the skill lab's base model with a skill or a merged composition of skills (CPU).

Uses loramix's merging library for merges, so it is what the server would serve.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"


def load_base(base_dir: Path = ASSETS / "base"):
    """The base model in float32, eval mode, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(base_dir)


def merged_adapter_dir(skills_dir: Path, names: list[str], out_dir: Path, *,
                       weights: list[float] | None = None, method: str = "cat",
                       rank: int | None = None, options: dict | None = None) -> Path:
    """Merge the named skills with `method` (weights None: 1/N each) into a PEFT dir."""
    from merging import load_adapter, merge

    adapters = [load_adapter(skills_dir / name) for name in names]
    result = merge(adapters, weights, method=method, rank=rank, names=names, options=options)
    result.adapter.save(out_dir)
    return out_dir


def with_adapter(base_model, adapter_dir: Path):
    """A PeftModel of `base_model` with the adapter in `adapter_dir`, in eval mode.

    The base model is wrapped in place; call `.unload()` on the result to get it back clean.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, adapter_dir).eval()


def with_composition(base_model, skills_dir: Path, names: list[str], **merge_args):
    """A PeftModel of `base_model` with the merge of `names` (see `merged_adapter_dir`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = merged_adapter_dir(skills_dir, names, Path(tmp) / "merged", **merge_args)
        return with_adapter(base_model, path)
