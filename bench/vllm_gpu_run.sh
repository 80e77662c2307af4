#!/usr/bin/env bash
# The GPU machine's side of bench/vllm_gpu.py, after shared/gpu-vllm staged vLLM into /tmp/site
# (see docs/vllm.md). One step per device run, all in the same warm machine:
#   bash bench/vllm_gpu_run.sh check     # engine tests on the GPU's vLLM (fp32 greedy = peft, local)
#   bash bench/vllm_gpu_run.sh vllm      # build model + skills, vLLM's own server under load
#   bash bench/vllm_gpu_run.sh loramix   # loramix serve --engine vllm under load, new compositions
#   bash bench/vllm_gpu_run.sh agreement # bf16 greedy tokens: loramix's vLLM and local engines vs peft
# Results go to $OUT (the device tool's output folder) or bench/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUTDIR=${OUT:-bench/results}
WORK=/tmp/vllm-gpu-bench
RESULT=$WORK/vllm_gpu_h200.json
step=${1:?check, vllm, loramix or agreement}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
case "$step" in
  check)
    LORAMIX_REQUIRE_ALL=1 timeout 420 python3 -m pytest -q -x -p no:cacheprovider \
      tests/test_vllm_surface.py tests/test_vllm_engine.py 2>&1 | tee "$OUTDIR/vllm_gpu_check.log" | tail -30
    ;;
  vllm|loramix|agreement)
    [ "$step" = vllm ] && phases="build vllm" || phases="$step"
    for phase in $phases; do
      timeout 560 python3 -m bench.vllm_gpu --phase "$phase" --work "$WORK" --out "$RESULT" \
        --gpu-memory-utilization 0.8 2>&1 | grep -v " INFO \|^INFO" | tail -60
    done
    cp "$RESULT" "$OUTDIR/" 2>/dev/null  # at most 8 files come back: the results, then server logs
    for f in "$WORK"/loramix.log "$WORK"/vllm-server.log; do
      [ -f "$f" ] && tail -c 20000 "$f" > "$OUTDIR/$(basename "$f")"
    done
    ;;
esac
