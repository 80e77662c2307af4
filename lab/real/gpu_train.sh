#!/usr/bin/env bash
# The GPU machine's side of training the real-model skills, after lab/real/gpu_pack.sh's parts
# were staged (they convert SmolLM2-135M-Instruct to /tmp/models). One step per device run:
#   bash lab/real/gpu_train.sh train   # train all five skills; bf16 adapters, one tar each, to $OUT
#   bash lab/real/gpu_train.sh eval    # accuracy (n per task) of the base, each skill, cat merges
#   bash lab/real/gpu_train.sh quality --skills DIR [--base DIR] [--device cuda] [-- bench.real_quality flags]
#       the whole merge-quality table (bench/real_quality.py) in one call; writes to $OUT:
#       quality.json, quality.md, quality.log, mixed.tar (the mixed-data LoRA, bf16)
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=/tmp/site-real:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
OUTDIR=${OUT:-/tmp/real-out}; mkdir -p "$OUTDIR"
BASE=/tmp/models/SmolLM2-135M-Instruct
SKILLS=/tmp/real-skills
N=${N:-200}
PY=${PYTHON:-python3}
case "${1:?train, eval or quality}" in
  train)
    "$PY" -m lab.real.train --device cuda --base "$BASE" --out "$SKILLS" --skill all 2>&1 | grep -v Warning | tail -40
    "$PY" - "$SKILLS" <<'PY'
import sys, pathlib, torch
from safetensors.torch import load_file, save_file
for f in pathlib.Path(sys.argv[1]).glob("*/adapter_model.safetensors"):
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(f).items()}, f)
PY
    for d in "$SKILLS"/*/; do tar -cf "$OUTDIR/$(basename "$d").tar" -C "$SKILLS" "$(basename "$d")"; done
    ls -la "$OUTDIR"
    ;;
  eval)
    EV=/tmp/real-eval; mkdir -p $EV
    "$PY" -m lab.real.evaluate --device cuda --base "$BASE" --size "$N" --out "$EV/base.json" 2>&1 | tail -12
    for s in arithmetic words capital json upper; do
      "$PY" -m lab.real.evaluate --device cuda --base "$BASE" --adapter "$SKILLS/$s" --size "$N" \
        --out "$EV/$s.json" 2>&1 | tail -10
    done
    for pair in arithmetic,words arithmetic,json capital,json capital,upper; do
      a=${pair%,*}; b=${pair#*,}
      "$PY" -m server.cli merge "$SKILLS/$a" "$SKILLS/$b" -o "/tmp/merged_${a}_$b" --method cat --quiet
      "$PY" -m lab.real.evaluate --device cuda --base "$BASE" --adapter "/tmp/merged_${a}_$b" --size "$N" \
        --out "$EV/cat_${a}_$b.json" 2>&1 | tail -10
    done
    "$PY" -c "import json,sys,pathlib; print(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path('$EV').glob('*.json'))}))" > "$OUTDIR/eval.json"
    ;;
  quality)
    shift; DEVICE=cuda; QSKILLS=""; EXTRA=()
    while (($#)); do
      case "$1" in
        --skills) QSKILLS=$2; shift 2 ;;
        --base) BASE=$2; shift 2 ;;
        --device) DEVICE=$2; shift 2 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
      esac
    done
    [[ -d "$QSKILLS" ]] || { echo "--skills DIR: a directory with one adapter per skill is required" >&2; exit 2; }
    [[ -d "$BASE" ]] || { echo "no base model at $BASE (stage it first: docs/real_model.md)" >&2; exit 2; }
    MIXED=$(mktemp -d)/mixed
    # A device command may run 600 s: stop the table in time to hand back the rows it scored.
    timeout "${QUALITY_LIMIT_S:-540}" "$PY" -m bench.real_quality --base "$BASE" --skills "$QSKILLS" \
      --device "$DEVICE" --size "$N" --out "$OUTDIR/quality.json" --save-mixed "$MIXED" "${EXTRA[@]}" \
      2>&1 >/dev/null | grep --line-buffered -v Warning | tee "$OUTDIR/quality.log" >&2
    rc=${PIPESTATUS[0]}
    [[ -f "$OUTDIR/quality.json" ]] && "$PY" -m bench.real_quality --render "$OUTDIR/quality.json" > "$OUTDIR/quality.md"
    if [[ -d "$MIXED" ]]; then
      "$PY" - "$MIXED/adapter_model.safetensors" <<'PY'
import sys, torch
from safetensors.torch import load_file, save_file
f = sys.argv[1]
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(f).items()}, f)
PY
      tar -cf "$OUTDIR/mixed.tar" -C "$(dirname "$MIXED")" mixed
    fi
    cat "$OUTDIR/quality.md"; ls -la "$OUTDIR"
    exit $rc
    ;;
esac
