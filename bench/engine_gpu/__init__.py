"""End-to-end decode throughput of the local engine on a GPU, against transformers + peft.

Run on a CUDA GPU (one H200 here):
    PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 python3 -m bench.engine_gpu --out $OUT/engine_gpu.json
Builds everything locally (no model hub): a Llama-1B-shaped model with random weights (hidden
2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000, bf16) saved with
save_pretrained, a word-level tokenizer, and 8 random rank-16 adapters on all seven projections
with non-zero lora_b. Then measures, with the same random prompts (32 requests, 128 prompt
tokens, 128 new tokens, greedy, EOS ignored), each after a warm-up:
  1. LocalEngine, base model only, 32 requests in flight at once;
  2. LocalEngine, the same 32 requests over 8 adapters (4 each), all in flight at once;
  (1 and 2 for each engine mode of --modes: decode replayed from CUDA graphs over a static
  KV cache, the static cache launched eagerly, the dynamic cache launched eagerly; in graphs
  mode the warm-up's first 64 replays are also run eagerly on the same inputs and the largest
  logit difference is reported: 0 means the graphs replay exactly the eager computation);
  3. transformers `generate` of the base model, batch 32;
  4. transformers + peft `generate` with all 8 adapters loaded and `adapter_names` per row
     (peft's mixed-batch inference), batch 32.
Output tokens/s and the LoRA overhead (throughput lost, mixed vs base) for loramix and peft.
Prints a markdown table and writes JSON. `--tiny` runs a tiny model on CPU (checks the script).
Imports only what LocalEngine needs (no FastAPI, vLLM or pydantic-settings).

Modules, one concern each: model (the random model, tokenizer and adapters, the environment),
measure (device sync, medians), engine (loramix's LocalEngine runs, replay checks, profile),
baseline (transformers and peft `generate`), report (overheads, the markdown table),
__main__ (the command line).
"""
