"""`--lora-kernels loramix`: makes vLLM build loramix's punica wrapper instead of its own.

vLLM chooses its LoRA kernels through `current_platform.get_punica_wrapper()` (a qualname,
resolved by vllm.lora.punica_wrapper.punica_selector in each worker). `register` is
loramix's `vllm.general_plugins` entry point (pyproject.toml), which vLLM runs in every one
of its processes: when LORAMIX_LORA_KERNELS=loramix (set by the vLLM engine before AsyncLLM
starts, so spawned processes inherit it) it points that one platform method at loramix's
wrapper for the platform's own (GPU -> LoramixPunicaWrapper, CPU -> LoramixPunicaWrapperCPU).
Nothing else in vLLM changes. With VLLM_PLUGINS set, it must name `loramix_lora_kernels`.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path

ENV = "LORAMIX_LORA_KERNELS"
CHOICES = ("vllm", "loramix")
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "loramix_lora_kernels"
PLUGIN_VALUE = "server.engines.vllm.punica_plugin:register"
# vLLM's wrapper class name -> loramix's wrapper for the same platform.
WRAPPERS = {
    "PunicaWrapperGPU": "server.engines.vllm.punica.LoramixPunicaWrapper",
    "PunicaWrapperCPU": "server.engines.vllm.punica.LoramixPunicaWrapperCPU",
}

logger = logging.getLogger("vllm.loramix")  # under vLLM's logger: printed in its processes
# vLLM keys its torch.compile caches (torch_compile_cache, and the AOT-compiled model it
# loads without tracing again, on by default with torch >= 2.10) by its config and its own
# environment variables: not by the punica wrapper. A server with loramix's kernels started
# after one with vLLM's on the same cache loaded the graph compiled around vLLM's kernels
# (seen on the H200: the LoRA layers never reached loramix's op). vLLM hashes its
# `additional_config`, so this entry in it gives each choice its own cache.
ADDITIONAL_CONFIG_KEY = "loramix_lora_kernels"


def additional_config(choice: str) -> dict[str, str]:
    """vLLM's `additional_config` entry that keeps the compile caches of `choice` apart
    (none for vLLM's own kernels: their cache stays vLLM's default one)."""
    return {ADDITIONAL_CONFIG_KEY: choice} if choice == "loramix" else {}


def chosen_kernels() -> str:
    choice = os.environ.get(ENV, "vllm")
    if choice not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {choice!r}")
    return choice


def register() -> None:
    """vllm.general_plugins entry point (runs in every vLLM process, maybe more than once)."""
    if chosen_kernels() == "loramix":
        install()


def install() -> str:
    """Point the current platform's get_punica_wrapper at loramix's wrapper; returns its
    qualname. Idempotent. Raises on a platform whose vLLM wrapper loramix does not replace."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    ours = getattr(platform_cls.get_punica_wrapper, "loramix_wrapper", None)
    if ours is not None:
        return ours
    vllm_wrapper = current_platform.get_punica_wrapper()
    ours = WRAPPERS.get(vllm_wrapper.rsplit(".", 1)[-1])
    if ours is None:
        raise RuntimeError(f"--lora-kernels loramix replaces vLLM's GPU and CPU punica "
                           f"wrappers; this platform uses {vllm_wrapper}")

    def get_punica_wrapper(cls) -> str:
        return ours

    get_punica_wrapper.loramix_wrapper = ours
    get_punica_wrapper.loramix_original = platform_cls.__dict__.get("get_punica_wrapper")
    platform_cls.get_punica_wrapper = classmethod(get_punica_wrapper)
    logger.info("loramix LoRA kernels: %s uses %s instead of %s (pid %d)",
                platform_cls.__name__, ours, vllm_wrapper, os.getpid())
    return ours


def uninstall() -> None:
    """Undo install in this process (an engine started later with vLLM's kernels, which a
    forked engine core would otherwise inherit)."""
    from vllm.platforms import current_platform

    platform_cls = type(current_platform)
    if getattr(platform_cls.get_punica_wrapper, "loramix_wrapper", None) is None:
        return
    original = platform_cls.get_punica_wrapper.loramix_original
    if original is None:
        delattr(platform_cls, "get_punica_wrapper")
    else:
        platform_cls.get_punica_wrapper = original


def is_registered() -> bool:
    """Whether vLLM will find the entry point (loramix installed with its metadata, or a
    plugin distribution from write_plugin_dist on sys.path)."""
    return any(ep.name == PLUGIN_NAME and ep.value == PLUGIN_VALUE
               for ep in entry_points(group=PLUGIN_GROUP))


def write_plugin_dist(site_dir: Path) -> Path:
    """Write a minimal distribution that declares only the entry point into site_dir, for a
    checkout run from PYTHONPATH without `pip install` (the GPU bench machine): with
    site_dir on PYTHONPATH, every vLLM process finds the plugin. Returns the dist-info dir."""
    dist = Path(site_dir) / "loramix_lora_kernels-0.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: loramix-lora-kernels\n"
                                   "Version: 0\n")
    (dist / "entry_points.txt").write_text(f"[{PLUGIN_GROUP}]\n{PLUGIN_NAME} = {PLUGIN_VALUE}\n")
    return dist


class PunicaStatsExtension:
    """vLLM worker extension: `collective_rpc("loramix_punica_stats")` returns, per worker,
    the class and call counts of loramix's punica wrappers there (empty under vLLM's own)."""

    def loramix_punica_stats(self) -> list[dict]:
        punica = sys.modules.get("server.engines.vllm.punica")  # imported only when in use
        return punica.punica_stats() if punica is not None else []
