#!/usr/bin/env bash
# Install loramix into .venv and start the server. With no arguments it serves the demo (the
# skill lab's trained model and four skills from lab/assets, local engine) on 127.0.0.1:8000.
# Arguments go to `loramix serve`, e.g. scripts/serve.sh --base-model DIR --skills DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/loramix serve "$@"
