"""`loramix tune-cat`: learn CAT's per-module weights (lab.learned_cat) for skills of the
server's skills directory and save them as a named composition the running server serves.
Offline training, so it lives in lab/; the server's CLI imports it only when the command runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch

from lab.learned_cat import TuneResult, tune_cat
from merging import InvalidMergeOptions, load_adapter, merge
from server.composition import CompositionInput, CompositionSpec, SkillTerm, canonical_spec, is_valid_name
from server.model_paths import resolve_model_paths
from server.named import NamedCompositions
from server.settings import Settings
from server.skills import SkillRegistry


def read_examples(path: Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from a JSONL file of {"prompt": ..., "completion": ...}
    objects (OpenAI's legacy fine-tuning format). Raises ValueError naming the bad line."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"line {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "completion")):
                raise ValueError(f'line {number}: expected {{"prompt": "...", "completion": "..."}}')
            if not record["completion"]:
                raise ValueError(f"line {number}: empty completion")
            examples.append((record["prompt"], record["completion"]))
    return examples


def tuned_spec(names: Sequence[str], result: TuneResult) -> CompositionSpec:
    """The named composition serving `result`: `cat`, the mean learned weights as the skills'
    weights, and the per-module weights that override them in every module."""
    request = CompositionInput(
        skills=tuple(SkillTerm(n, round(w, 6)) for n, w in zip(names, result.info["mean_weights"])),
        method="cat",
        module_weights=result.module_weights,
    )
    return canonical_spec(request, default_method="cat")


def tune_and_save(
    settings: Settings,
    names: Sequence[str],
    data: Path,
    composition_name: str,
    *,
    device: str | None = None,
    progress: Callable[[int, float], None] | None = None,
    **train_args,
) -> tuple[TuneResult, CompositionSpec]:
    """Learn CAT weights for skills `names` of the server configured by `settings` and save them
    as the named composition `composition_name` (served without a restart)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_valid_name(composition_name):
        raise InvalidMergeOptions(
            "a composition name uses letters, digits, '.', '_' and '-' and starts with a letter or digit",
            param="name")
    base_dir, skills_dir, base_name = resolve_model_paths(settings)
    registry = SkillRegistry(skills_dir)
    registry.scan()
    if composition_name == base_name or composition_name in registry:
        raise InvalidMergeOptions(f"'{composition_name}' is already the name of the base model or a skill",
                                  param="name")
    if len(set(names)) != len(names):
        raise InvalidMergeOptions("a skill is named twice", param="skills")
    missing = [n for n in names if n not in registry]
    if missing:
        known = ", ".join(sorted(registry.scan())) or "none"
        raise InvalidMergeOptions(f"unknown skill(s) {', '.join(missing)} (known: {known})", param="skills")
    adapters = [load_adapter(registry.get(n).path, name=n) for n in names]
    examples = read_examples(data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    result = tune_cat(model, tokenizer, adapters, examples, progress=progress, **train_args)
    spec = tuned_spec(names, result)
    # Merge once so a problem shows here, not on the server's first request.
    merge(adapters, result.info["mean_weights"], method="cat", names=names, module_weights=result.module_weights)
    NamedCompositions(settings.resolved_cache_dir(base_dir, skills_dir)).put(composition_name, spec)
    return result, spec
