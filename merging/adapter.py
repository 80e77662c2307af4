"""LoRA adapters in memory, and the PEFT on-disk format (adapter_config.json + safetensors).

A LoRA module adds ΔW = scaling · lora_b @ lora_a to a base weight W [out, in], with
lora_a [r, in], lora_b [out, r]. The scaling (alpha/r, or alpha/sqrt(r) for rsLoRA, with
peft's rank_pattern/alpha_pattern honoured) is computed once, at load time, and kept beside the
factors. Saving folds it into lora_b and writes a uniform-rank adapter with lora_alpha = r, so
peft and vLLM both read scaling 1 and apply exactly the ΔW held here.
"""

from __future__ import annotations

import hashlib
import json
import math
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from merging.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_RE = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.[^.]+)?\.weight")
# safetensors 0.8's default "mmap" backend keeps about 7 KiB of native memory and two Python
# objects per tensor it loads, for ever (a 28-tensor adapter: +7.4 KiB RSS per load; a server
# loading adapters all day grew by ~1 MiB/min, bench/RESULTS.md "Soak"). Its "pread" backend
# reads the same bytes into tensors that own their memory and keeps nothing.
_LOAD_OPTIONS = {"backend": "pread"} if "backend" in inspect.signature(load_file).parameters else {}
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out layers (Conv1D)",
}


@dataclass
class LoraModule:
    """One adapted linear layer: ΔW = scaling · lora_b @ lora_a."""

    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scaling: float = 1.0

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    @property
    def in_features(self) -> int:
        return self.lora_a.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_b.shape[0]

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ΔW [out, in]. For tests and small layers only."""
        return self.scaling * (self.lora_b.to(dtype) @ self.lora_a.to(dtype))


@dataclass
class LoraAdapter:
    """A LoRA adapter: module path in the base model -> LoraModule.

    Module paths are those of the base model, e.g. "model.layers.0.self_attn.q_proj".
    """

    modules: dict[str, LoraModule]
    base_model: str | None = None
    dtype: torch.dtype = torch.float32
    extra_config: dict = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def num_bytes(self) -> int:
        return sum(m.lora_a.nbytes + m.lora_b.nbytes for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        """The distinct last path components (q_proj, ...), as peft's target_modules."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    def save(self, path: str | Path) -> Path:
        return save_adapter(self, path)


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: a key matches a suffix of the module path."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?({key})", module):
            return value
    return default


def _module_scaling(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}


def _shown(value) -> str:
    """A config value in a message: numbers as they are, anything else by its JSON type
    (a string may hold a path)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value)
    return _JSON_TYPES.get(type(value), "a value")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_problems(config: dict, key: str, is_valid, expected: str) -> list[str]:
    patterns = config.get(key)
    if patterns is None:
        return []
    if not isinstance(patterns, dict):
        return [f"{key} must be an object, not {_shown(patterns)}"]
    problems = []
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error:
            problems.append(f"{key} has a key that is not a valid pattern")
        if not is_valid(value):
            problems.append(f"{key} values must be {expected}")
    return problems


def _target_problems(target) -> list[str]:
    if target is None:
        return []
    if isinstance(target, str):
        try:
            re.compile(target)
        except re.error:
            return ["target_modules is not a valid pattern"]
        return []
    if isinstance(target, list) and all(isinstance(item, str) for item in target):
        return []
    return ["target_modules must be a pattern or a list of module names"]


def _config_type_problems(config: dict) -> list[str]:
    """Values of the wrong JSON type or range, which make the scaling impossible to compute."""
    problems = []
    if "r" in config and not _is_positive_int(config["r"]):
        problems.append(f"r must be a positive integer, not {_shown(config['r'])}")
    if "lora_alpha" in config and not _is_finite_number(config["lora_alpha"]):
        problems.append(f"lora_alpha must be a finite number, not {_shown(config['lora_alpha'])}")
    if not isinstance(config.get("use_rslora", False), (bool, type(None))):
        problems.append("use_rslora must be a boolean")
    if not isinstance(config.get("base_model_name_or_path"), (str, type(None))):
        problems.append("base_model_name_or_path must be a string")
    problems += _pattern_problems(config, "rank_pattern", _is_positive_int, "positive integers")
    problems += _pattern_problems(config, "alpha_pattern", _is_finite_number, "finite numbers")
    return problems + _target_problems(config.get("target_modules"))


def _config_problems(config: dict) -> list[str]:
    problems = []
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        problems.append(f"peft_type {peft_type!r} is not LORA")
    for key, label in _UNSUPPORTED_FLAGS.items():
        if config.get(key):
            problems.append(f"{label} is not supported")
    if config.get("modules_to_save"):
        problems.append("modules_to_save (fully trained extra modules) is not supported")
    if config.get("bias", "none") not in (None, "none"):
        problems.append(f"trained biases (bias={config.get('bias')!r}) are not supported")
    return problems


def _group_tensors(tensors: dict[str, torch.Tensor], problems: list[str]) -> dict[str, dict]:
    pairs: dict[str, dict] = {}
    for key, tensor in tensors.items():
        match = _KEY_RE.fullmatch(key)
        if match is None:
            kind = "embedding LoRA" if "lora_embedding" in key else "tensor"
            problems.append(f"unsupported {kind} {key!r}")
            continue
        pairs.setdefault(match["module"], {})[match["factor"]] = tensor
    return pairs


def _build_module(module: str, pair: dict, config: dict, problems: list[str]) -> LoraModule | None:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        problems.append(f"module {module!r} has no {missing}")
        return None
    lora_a, lora_b = pair["A"], pair["B"]
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
        problems.append(
            f"module {module!r}: lora_A {tuple(lora_a.shape)} and lora_B {tuple(lora_b.shape)} "
            "are not [r, in] and [out, r]"
        )
        return None
    rank = lora_a.shape[0]
    if rank == 0:
        problems.append(f"module {module!r} has rank 0")
        return None
    declared = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", rank))
    if declared != rank:
        problems.append(f"module {module!r} has rank {rank} but the config declares {declared}")
        return None
    if not (torch.isfinite(lora_a).all() and torch.isfinite(lora_b).all()):
        problems.append(f"module {module!r} holds NaN or infinite values")
        return None
    return LoraModule(lora_a, lora_b, _module_scaling(config, module, rank))


def load_adapter(path: str | Path, *, name: str | None = None) -> LoraAdapter:
    """Load and validate a PEFT LoRA directory; every problem is collected into one AdapterError.

    `name` is how the adapter is called in error messages (default: the directory's name).
    """
    path = Path(path)
    label = name or path.name
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"adapter {label!r} needs {CONFIG_NAME} and {WEIGHTS_NAME}", param=label)
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(weights_file, **_LOAD_OPTIONS)
    except Exception as exc:  # noqa: BLE001 - any decode failure of an untrusted file is the same error
        raise AdapterError(f"adapter {label!r} cannot be read: {type(exc).__name__}", param=label) from None
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {label!r} is not usable: {CONFIG_NAME} is not a JSON object", param=label)
    type_problems = _config_type_problems(config)
    problems = _config_problems(config) + type_problems
    modules = {}
    for module, pair in sorted(_group_tensors(tensors, problems).items()):
        built = None if type_problems else _build_module(module, pair, config, problems)
        if built is not None:
            modules[module] = built
    if not modules and not problems:
        problems.append("it holds no LoRA modules")
    if problems:
        raise AdapterError(f"adapter {label!r} is not usable: " + "; ".join(problems), param=label)
    dtypes = {t.dtype for m in modules.values() for t in (m.lora_a, m.lora_b)}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    extra = {k: config[k] for k in ("task_type",) if config.get(k)}
    return LoraAdapter(modules, config.get("base_model_name_or_path"), dtype, extra)


def save_adapter(adapter: LoraAdapter, path: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write `adapter` as a PEFT directory that peft and vLLM load unchanged.

    Scaling is folded into lora_b and every module is zero-padded to the adapter's largest
    rank, so the config is a plain `r = lora_alpha = rank` (scaling 1, no rank_pattern).
    Zero rows/columns add nothing to ΔW.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or adapter.dtype
    rank = adapter.max_rank
    tensors = {}
    for module, lora in adapter.modules.items():
        pad = rank - lora.rank
        lora_a = torch.nn.functional.pad(lora.lora_a.float(), (0, 0, 0, pad))
        lora_b = torch.nn.functional.pad(lora.lora_b.float() * lora.scaling, (0, pad))
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": adapter.extra_config.get("task_type", "CAUSAL_LM"),
        "base_model_name_or_path": adapter.base_model,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": adapter.target_modules,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "inference_mode": True,
    }
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


def adapter_digest(path: str | Path) -> str:
    """sha256 over the adapter's config and weights bytes (content-addressed cache keys)."""
    path = Path(path)
    digest = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        digest.update(name.encode())
        with open(path / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
