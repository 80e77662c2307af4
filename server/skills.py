"""The skill registry: a directory of PEFT adapters, one sub-directory per skill."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import merging

from server.composition import is_valid_name
from server.errors import LoramixError, model_not_found

logger = logging.getLogger("loramix.skills")


@dataclass(frozen=True)
class Skill:
    """One validated skill adapter."""

    name: str
    path: Path
    digest: str
    rank: int
    num_bytes: int
    target_modules: tuple[str, ...]


class SkillRegistry:
    """Skills found under `skills_dir`. Each adapter is loaded and validated once per content
    digest; invalid ones are left out and their problems kept in `problems` (path-free)."""

    def __init__(self, skills_dir: Path | None, module_shapes: dict[str, tuple[int, int]] | None = None) -> None:
        """module_shapes: (out_features, in_features) of the base model's linear layers; when
        given, adapters whose modules do not fit the base model are rejected."""
        self.skills_dir = Path(skills_dir) if skills_dir is not None else None
        self.module_shapes = module_shapes
        self._skills: dict[str, Skill] = {}
        self.problems: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scanned_mtime_ns: int | None = None

    def scan(self) -> dict[str, Skill]:
        """(Re)read the skills directory; unchanged adapters are not reloaded."""
        found: dict[str, Skill] = {}
        problems: dict[str, str] = {}
        mtime_ns = self._dir_mtime_ns()
        for entry in self._candidates():
            try:
                found[entry.name] = self._load(entry)
            except merging.MergeError as exc:
                problems[entry.name] = str(exc)
                logger.warning("skill '%s' is not usable: %s", entry.name, exc)
        with self._lock:
            self._skills = found
            self.problems = problems
            self._scanned_mtime_ns = mtime_ns
        return dict(found)

    def _dir_mtime_ns(self) -> int | None:
        try:
            return self.skills_dir.stat().st_mtime_ns if self.skills_dir is not None else None
        except OSError:
            return None

    def is_stale(self) -> bool:
        """True if skill directories were added or removed since the last scan (one stat)."""
        return self._dir_mtime_ns() != self._scanned_mtime_ns

    def _candidates(self) -> list[Path]:
        if self.skills_dir is None or not self.skills_dir.is_dir():
            return []
        entries = []
        for entry in sorted(self.skills_dir.iterdir()):
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            if not is_valid_name(entry.name):
                logger.warning("ignoring skill directory with an invalid name: %r", entry.name)
                continue
            if not (entry / "adapter_config.json").is_file():
                continue
            entries.append(entry)
        return entries

    def _load(self, path: Path) -> Skill:
        digest = merging.adapter_digest(path)
        known = self._skills.get(path.name)
        if known is not None and known.digest == digest:
            return known
        adapter = merging.load_adapter(path, name=path.name)
        self._check_fits_base(path.name, adapter)
        return Skill(
            name=path.name,
            path=path,
            digest=digest,
            rank=adapter.max_rank,
            num_bytes=adapter.num_bytes,
            target_modules=tuple(sorted(adapter.modules)),
        )

    def _check_fits_base(self, name: str, adapter: merging.LoraAdapter) -> None:
        if self.module_shapes is None:
            return
        problems = []
        for module, lora in sorted(adapter.modules.items()):
            expected = self.module_shapes.get(module)
            actual = (lora.out_features, lora.in_features)
            if expected is None:
                problems.append(f"module {module!r} does not exist in the base model")
            elif expected != actual:
                problems.append(f"module {module!r} is {actual} but {expected} in the base model")
        if problems:
            shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
            raise merging.AdapterError(f"adapter '{name}' does not fit the base model: {shown}")

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._skills)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._skills

    def get(self, name: str, param: str = "model") -> Skill:
        """The skill `name`; 404 model_not_found if there is none (or 400 if it is broken)."""
        if not is_valid_name(name):
            raise model_not_found(name, param)
        with self._lock:
            skill = self._skills.get(name)
            problem = self.problems.get(name)
        if skill is not None:
            return skill
        if problem is not None:
            raise LoramixError(400, "invalid_adapter", f"Skill '{name}' is not usable: {problem}", param=param)
        raise model_not_found(name, param)

    def load(self, name: str) -> merging.LoraAdapter:
        """Load the skill's adapter weights (for merging)."""
        skill = self.get(name)
        return merging.load_adapter(skill.path, name=name)


def base_module_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every linear layer of the base model, by module path,
    from its config alone (the model is built on the meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
