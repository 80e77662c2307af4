"""The public surface of a vLLM source tree, read statically (no import, so any version's
wheel can be read on any host): the names the loramix vLLM engine may touch.

    python tests/vllm_surface.py VLLM_PACKAGE_DIR > tests/data/vllm_surface_<version>.json

VLLM_PACKAGE_DIR is the `vllm/` folder of an unpacked wheel or an installed vLLM. The file for
the oldest supported vLLM (0.26.0, the GPU machine's) was made from the wheel that
shared/gpu-vllm/pack.sh downloads.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

OLDEST_SUPPORTED = "0.26.0"  # server.engines.vllm.compat.OLDEST_SUPPORTED (tests check they agree)

# (module, class) pairs whose members (methods, properties, dataclass fields, attributes set
# in __init__) are recorded; base classes defined in the same list are merged in.
CLASSES = (
    ("vllm.v1.engine.async_llm", "AsyncLLM"),
    ("vllm.v1.engine.output_processor", "OutputProcessor"),
    ("vllm.engine.arg_utils", "EngineArgs"),
    ("vllm.engine.arg_utils", "AsyncEngineArgs"),
    ("vllm.sampling_params", "SamplingParams"),
    ("vllm.sampling_params", "RequestOutputKind"),
    ("vllm.lora.request", "LoRARequest"),
    ("vllm.outputs", "RequestOutput"),
    ("vllm.outputs", "CompletionOutput"),
    ("vllm.inputs.llm", "TokensPrompt"),
    # --lora-kernels loramix (server/engines/vllm/punica*.py)
    ("vllm.lora.punica_wrapper.punica_base", "PunicaWrapperBase"),
    ("vllm.lora.punica_wrapper.punica_gpu", "PunicaWrapperGPU"),
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU"),
    ("vllm.lora.layers.utils", "LoRAMapping"),
    ("vllm.platforms.interface", "Platform"),
)
# Modules whose top-level names (definitions, imports, __all__) are recorded.
MODULES = (
    "vllm",
    "vllm.exceptions",
    "vllm.inputs",
    "vllm.lora.request",
    "vllm.sampling_params",
    "vllm.engine.arg_utils",
    "vllm.platforms",
    "vllm.v1.engine.async_llm",
    "vllm.lora.ops.torch_ops",
    "vllm.lora.punica_wrapper",
    "vllm.lora.punica_wrapper.punica_gpu",
    "vllm.lora.punica_wrapper.punica_cpu",
    "vllm.lora.punica_wrapper.punica_selector",
    "vllm.plugins",
)


def module_file(root: Path, module: str) -> Path | None:
    """The source file of `module` under the vllm package dir `root`."""
    parts = module.split(".")[1:]
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _target_names(target: ast.expr) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for element in target.elts for name in _target_names(element)]
    return []


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a module defines or imports at top level (also inside top-level if/try)."""
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update(_target_names(target))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                if isinstance(node.value, (ast.List, ast.Tuple)):
                    names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
        elif isinstance(node, ast.AnnAssign):
            names.update(_target_names(node.target))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.If, ast.Try)):
            body.extend(node.body)
            body.extend(getattr(node, "orelse", []))
            for handler in getattr(node, "handlers", []):
                body.extend(handler.body)
    return names


def class_members(tree: ast.Module, name: str) -> tuple[set[str], list[str]] | None:
    """(members, base class names) of class `name` in `tree`, or None if absent."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            members: set[str] = set()
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.add(item.name)
                    if item.name in ("__init__", "__post_init__"):
                        members.update(_self_attributes(item))
                elif isinstance(item, ast.AnnAssign):
                    members.update(_target_names(item.target))
                elif isinstance(item, ast.Assign):
                    for target in item.targets:
                        members.update(_target_names(target))
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            return members, bases
    return None


def _self_attributes(function: ast.FunctionDef) -> set[str]:
    found = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                found.add(target.attr)
    return found


def _submodules(root: Path, module: str) -> set[str]:
    """Names of the modules and packages inside package `module` (importable as names)."""
    package = root.joinpath(*module.split(".")[1:])
    if not (package / "__init__.py").is_file():
        return set()
    return {p.stem for p in package.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in package.glob("*/__init__.py")
    }


def read_surface(root: Path) -> dict:
    """The surface of the vllm package dir `root` as a JSON-able dict."""
    root = Path(root)
    version_file = root / "_version.py"
    version = None
    if version_file.is_file():
        for line in version_file.read_text().splitlines():
            if line.startswith(("__version__", "version =")) and "=" in line:
                version = line.rsplit("=", 1)[1].strip().strip("'\"")
                break
    trees = {}

    def tree_of(module: str) -> ast.Module | None:
        if module not in trees:
            path = module_file(root, module)
            trees[module] = ast.parse(path.read_text()) if path else None
        return trees[module]

    classes: dict[str, list[str]] = {}
    for module, name in CLASSES:
        tree = tree_of(module)
        found = class_members(tree, name) if tree else None
        if found is None:
            continue
        members, bases = found
        for base_module, base_name in CLASSES:
            if base_name in bases and f"{base_module}.{base_name}" in classes:
                members |= set(classes[f"{base_module}.{base_name}"])
        classes[f"{module}.{name}"] = sorted(members)
    modules = {
        module: sorted(top_level_names(tree_of(module)) | _submodules(root, module))
        for module in MODULES
        if tree_of(module) is not None
    }
    return {"version": version, "classes": classes, "modules": modules}


class SurfaceProxy:
    """An object restricted to the names a recorded vLLM surface lists for its class: the
    engine sees what it would see on that version (AttributeError for anything newer)."""

    def __init__(self, target, allowed: set[str]) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_allowed", allowed)

    def __getattr__(self, name: str):
        if name not in self._allowed:
            raise AttributeError(f"vLLM {OLDEST_SUPPORTED}'s AsyncLLM has no attribute '{name}'")
        return getattr(self._target, name)


def recorded_surface(version: str = OLDEST_SUPPORTED) -> dict:
    """The surface recorded in tests/data for `version`."""
    return json.loads((Path(__file__).resolve().parent / "data" / f"vllm_surface_{version}.json").read_text())


def surface_0_26_proxy(llm) -> SurfaceProxy:
    """`llm` (an AsyncLLM) as vLLM 0.26's AsyncLLM surface allows it to be used."""
    return SurfaceProxy(llm, set(recorded_surface()["classes"]["vllm.v1.engine.async_llm.AsyncLLM"]))


def exceptions_missing_in_0_26() -> list[str]:
    """Names of the installed vllm.exceptions that 0.26 lacks."""
    import vllm.exceptions

    old = set(recorded_surface()["modules"]["vllm.exceptions"])
    return [name for name in dir(vllm.exceptions) if not name.startswith("_") and name not in old]


if __name__ == "__main__":
    json.dump(read_surface(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
