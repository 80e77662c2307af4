#!/usr/bin/env bash
# One GPU run of the kernels benchmark (one H200, < 8 min): correctness of the plain kernels
# and every kernel variant / candidate config over the bench grid (+ fp16/fp32 spots),
# CUDA-graph replay check of every variant, timings of the grid (Llama-3-8B shapes, ranks
# 16/64, 1..4096 tokens, 1/8/32 adapters) for the plain kernels, each variant and the
# candidate table. Writes under $OUT:
#   kernels.json (raw, saved after every row), kernels.md (rendered section: main table,
#   variant A/B table, the host rules the data supports), log.txt, nvidia_smi.txt.
# Run from the repository root:  bash bench/gpu_kernels_run.sh
set -uo pipefail
OUT=${OUT:-/tmp/loramix_kernels_run}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
  --format=csv > "$OUT/nvidia_smi.txt" 2>&1
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/nvidia_smi.txt"
# SIGINT at 450 s: the benchmark saves the rows measured so far; past 380 s it times with fewer
# graph replays (shapes are never dropped).
PYTHONUNBUFFERED=1 timeout -s INT -k 15 450 "$PY" -m bench.kernels --out "$OUT/kernels.json" \
  --deadline-s 380 > "$OUT/log.txt" 2>&1
rc=$?
grep -E "^(correctness|  FAIL|graph replay .*FAIL|copy bandwidth|total|timings)" "$OUT/log.txt"
if [ -s "$OUT/kernels.json" ]; then
  echo "# Benchmark results" > "$OUT/kernels.md"
  "$PY" -m bench.kernels --render "$OUT/kernels.json" --results "$OUT/kernels.md"
  sed -nE '/^- Decode/,/^- (Against|No vLLM)/p;/^### Kernel variants/,/^\| K→N/p;/^Rules the data/,$p' \
    "$OUT/kernels.md"
fi
echo "bench.kernels exit code $rc"
exit $rc
