"""Benchmark of loramix's multi-LoRA kernels against torch baselines and the bytes floor.

Run on a CUDA GPU (one H200 here); bench/gpu_kernels_run.sh is the one-call driver:
    PYTHONUNBUFFERED=1 python3 -m bench.kernels --out $OUT/kernels.json --deadline-s 420
Steps: (1) GPU correctness of the full grid against the torch reference for the plain kernels
and every kernel variant / candidate config in COMBOS (bf16, plus fp16/fp32 spot checks), in
parallel worker processes (which also fill triton's compile cache), (2) CUDA-graph replay check
of every variant, (3) optional config sweep (--sweep), (4) timings by CUDA-graph replay
(median): plain fused / unfused, each variant, the candidate table, torch gather-bmm, torch
per-adapter loop, the base linear layer, and the bytes floor. Decode rows are timed first; past
--deadline-s the repetitions shrink. Writes JSON after every row; `--render JSON --results
bench/RESULTS.md` turns a JSON into the "## Kernels" section (with the variant A/B table and
the rules the data supports). `--smoke` runs a tiny grid on CPU (TRITON_INTERPRET=1) through
every step to check the script itself.

Modules, one concern each: grid (shapes, kernel combos, inputs), check (correctness against
the torch reference), sweep (launch-config candidates), timing (graph-replay timings and the
torch baselines), render and variants (the RESULTS.md section), __main__ (the command line).
"""
