"""The skill registry: a directory of PEFT adapters, one sub-directory per skill."""

from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import merging
from merging.adapter import CONFIG_NAME, WEIGHTS_NAME

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


@dataclass(frozen=True)
class SkillProblem:
    """Why a skill is not usable. code: `invalid_adapter` (its files are there but wrong) or
    `skill_unavailable` (its files are missing, unreadable, or lead outside the skills dir).
    reason: path-free, shown to clients."""

    code: str
    reason: str


class SkillUnusable(Exception):
    """Raised while loading a skill; becomes its SkillProblem."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.problem = SkillProblem(code, reason)


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced: (mtime, size, inode), or None."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


class SkillRegistry:
    """Skills found under `skills_dir`. Each adapter is loaded and validated once per content
    digest; a broken one is left out and its problem kept in `problems` (path-free), and the
    rest keep serving."""

    def __init__(self, skills_dir: Path | None, module_shapes: dict[str, tuple[int, int]] | None = None) -> None:
        """module_shapes: (out_features, in_features) of the base model's linear layers; when
        given, adapters whose modules do not fit the base model are rejected."""
        self.skills_dir = Path(skills_dir) if skills_dir is not None else None
        self.module_shapes = module_shapes
        self._skills: dict[str, Skill] = {}
        self.problems: dict[str, SkillProblem] = {}
        self._lock = threading.Lock()
        self._signature: tuple | None = None

    def scan(self) -> dict[str, Skill]:
        """(Re)read the skills directory; unchanged adapters are not reloaded."""
        found: dict[str, Skill] = {}
        problems: dict[str, SkillProblem] = {}
        signature = self._signature_now()
        for entry in self._candidates():
            try:
                found[entry.name] = self._load(entry)
            except SkillUnusable as exc:
                problems[entry.name] = exc.problem
            except merging.MergeError as exc:
                problems[entry.name] = SkillProblem("invalid_adapter", str(exc))
            except OSError as exc:
                problems[entry.name] = SkillProblem(
                    "skill_unavailable", f"its files cannot be read ({errno.errorcode.get(exc.errno, 'I/O error')})"
                )
            except Exception:  # noqa: BLE001 - one broken skill must never stop the others
                logger.exception("skill '%s' could not be loaded", entry.name)
                problems[entry.name] = SkillProblem("invalid_adapter", "it could not be loaded")
        for name, problem in problems.items():
            if self.problems.get(name) != problem:
                logger.warning("skill '%s' is not usable (%s): %s", name, problem.code, problem.reason)
        with self._lock:
            self._skills = found
            self.problems = problems
            self._signature = signature
        return dict(found)

    def _signature_now(self) -> tuple | None:
        """Names and file stamps of every entry: changes when a skill is added, removed,
        or one of its files is written (a skill copied in while being scanned)."""
        if self.skills_dir is None:
            return None
        try:
            names = sorted(os.listdir(self.skills_dir))
        except OSError:
            return None
        root = str(self.skills_dir)
        return tuple(
            (name, _stamp(os.path.join(root, name)),
             _stamp(os.path.join(root, name, CONFIG_NAME)),
             _stamp(os.path.join(root, name, WEIGHTS_NAME)))
            for name in names
        )

    def is_stale(self) -> bool:
        """True if skills were added, removed or changed since the last scan (a few stats)."""
        return self._signature_now() != self._signature

    def _candidates(self) -> list[Path]:
        if self.skills_dir is None or not self.skills_dir.is_dir():
            return []
        entries = []
        for entry in sorted(self.skills_dir.iterdir()):
            if entry.name.startswith(".") or not (entry.is_dir() or entry.is_symlink()):
                continue
            if not is_valid_name(entry.name):
                logger.warning("ignoring skill directory with an invalid name: %r", entry.name)
                continue
            if entry.is_dir() and not os.path.lexists(entry / CONFIG_NAME):
                continue  # not an adapter (or not yet: it is picked up once its config is written)
            entries.append(entry)
        return entries

    def _check_files(self, path: Path) -> None:
        """The skill's directory and files exist, are what they should be, and stay inside the
        skills directory (links leading elsewhere are refused)."""
        root = os.path.realpath(self.skills_dir)
        for item in (path, path / CONFIG_NAME, path / WEIGHTS_NAME):
            if os.path.commonpath([root, os.path.realpath(item)]) != root:
                raise SkillUnusable("skill_unavailable", "it links outside the skills directory")
        if not path.is_dir():
            raise SkillUnusable("skill_unavailable", "it is a link to a directory that does not exist")
        for file_name in (CONFIG_NAME, WEIGHTS_NAME):
            item = path / file_name
            if item.is_dir():
                raise SkillUnusable("invalid_adapter", f"its {file_name} is a directory, not a file")
            if not item.is_file():
                what = "a link to nothing" if item.is_symlink() else "missing (still being copied?)"
                raise SkillUnusable("skill_unavailable", f"its {file_name} is {what}")

    def _load(self, path: Path) -> Skill:
        self._check_files(path)
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

    def snapshot(self) -> tuple[dict[str, Skill], dict[str, SkillProblem]]:
        """The usable skills and the problems of the unusable ones, from one scan."""
        with self._lock:
            return dict(self._skills), dict(self.problems)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._skills)

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._skills

    def get(self, name: str, param: str = "model") -> Skill:
        """The skill `name`; 404 model_not_found if there is none, 400 with its problem's code if
        it is not usable."""
        if not is_valid_name(name):
            raise model_not_found(name, param)
        with self._lock:
            skill = self._skills.get(name)
            problem = self.problems.get(name)
        if skill is not None:
            return skill
        if problem is not None:
            raise LoramixError(400, problem.code, f"The skill '{name}' is not usable: {problem.reason}", param=param)
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
