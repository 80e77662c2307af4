#!/usr/bin/env bash
# Install everything (torch CPU, vLLM on CPU, loramix + test tools) into .venv and run the
# whole test suite. Extra arguments go to pytest, e.g. scripts/test.sh -k merging.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q -ra "$@"
