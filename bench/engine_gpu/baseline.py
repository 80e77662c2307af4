"""The baselines measured in the same run: transformers `generate` of the base model, and
transformers + peft `generate` with every adapter loaded and `adapter_names` per row."""

from __future__ import annotations

import time

import torch

from bench.engine_gpu.measure import summary, sync


def hf_batch(model, input_ids, new_tokens, device, **kwargs) -> dict:
    """One batched greedy `generate` of exactly `new_tokens` tokens per row."""
    mask = torch.ones_like(input_ids)
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0, **kwargs)
    sync(device)
    seconds = time.perf_counter() - start
    generated = out[:, input_ids.shape[1]:]
    if generated.shape[1] != new_tokens:
        raise RuntimeError(f"generate returned {generated.shape[1]} tokens per row, "
                           f"expected {new_tokens}")
    produced = generated.numel()
    return {"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
            "outputs": generated.tolist()}


def hf_runs(model, input_ids, new_tokens, device, repeats, deadline, label, warmup_tokens,
            **kwargs):
    hf_batch(model, input_ids, warmup_tokens, device, **kwargs)  # warm-up
    runs = []
    for rep in range(repeats):
        if rep and time.monotonic() > deadline:
            print("  time budget reached: fewer repeats", flush=True)
            break
        run = hf_batch(model, input_ids, new_tokens, device, **kwargs)
        print(f"  {label} run {rep}: {run['tokens_per_s']:8.1f} tok/s ({run['seconds']:.2f} s)",
              flush=True)
        runs.append(run)
    outputs = runs[-1]["outputs"]
    for run in runs:
        run.pop("outputs")
    return summary(runs), outputs


def bench_hf(base_dir, adapter_dirs, prompts, cfg, repeats, peft_repeats, deadline) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    device = cfg["device"]
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=getattr(torch, cfg["dtype"]))
    model.to(device).eval()
    input_ids = torch.tensor(prompts, device=device)
    base, base_out = hf_runs(model, input_ids, cfg["new_tokens"], device, repeats, deadline,
                             "transformers base ", cfg["new_tokens"])
    peft_model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="skill0")
    for i, path in enumerate(adapter_dirs[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"skill{i}")
    peft_model.eval()
    per_row = len(prompts) // len(adapter_dirs)
    names = [f"skill{i // per_row}" for i in range(len(prompts))]
    mixed, mixed_out = hf_runs(peft_model, input_ids, cfg["new_tokens"], device, peft_repeats,
                               deadline, "peft mixed        ",
                               # Short: the base runs above already met every KV length, and
                               # a full-length peft run takes over 20 s on the H200.
                               min(8, cfg["new_tokens"]), adapter_names=names)
    del peft_model, model
    return {"base": base, "mixed": mixed, "outputs": {"base": base_out, "mixed": mixed_out}}
