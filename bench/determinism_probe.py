"""Probe: which op of the local engine's bf16 decode forward is not bitwise reproducible?

Run 9 found that the same eager decode forward, run twice on the same inputs, gives logits
that differ by up to 0.108 in bf16 (and by 0 in fp32). This runs each candidate twice on
identical inputs at the engine bench's shapes (Llama-1B: hidden 2048, 32 rows, rank 16, 8
adapters) and prints the largest difference: our multi-LoRA kernels (planned pair, forced
fused), cuBLAS linears, SDPA with a boolean mask over a strided KV window, and whole model
forwards. Run on a CUDA GPU: python3 -m bench.determinism_probe
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import add_lora_planned, build_meta


def twice(fn) -> float:
    """max |fn() - fn()| over two calls on the same inputs (fn returns a fresh tensor)."""
    first, second = fn().float(), fn().float()
    return float((first - second).abs().max())


def main() -> None:
    device, dtype, rows, rank, adapters = "cuda", torch.bfloat16, 32, 16, 8
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device).to(dtype)  # noqa: E731
    slot_ids = (torch.arange(rows, device=device) % adapters).to(torch.int32)
    for k, n in ((2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)):
        x, y = rnd(rows, k), rnd(rows, n)
        lora_a, lora_b = rnd(adapters, rank, k) / k ** 0.5, rnd(adapters, n, rank) * 0.02
        weight = rnd(n, k) / k ** 0.5
        for fused in (None, True):
            meta = build_meta(slot_ids, adapters)
            diff = twice(lambda: add_lora_planned(y.clone(), x, lora_a, lora_b, meta, fused=fused))
            print(f"add_lora_planned {k}->{n} fused={fused}: {diff:.3g}")
        print(f"F.linear {k}->{n}: {twice(lambda: F.linear(x, weight)):.3g}")
    # SDPA as the static decoder calls it: 32 heads over 8 KV heads, a strided KV window.
    keys, values = rnd(rows, 8, 2048, 64), rnd(rows, 8, 2048, 64)
    query = rnd(rows, 32, 1, 64)
    mask = torch.rand(rows, 2048, device=device, generator=gen) < 0.6
    window = (keys[:, :, :256], values[:, :, :256], mask[:, None, None, :256])
    for kv_label, k_, v_ in (("strided KV", *window[:2]),
                             ("contiguous KV", window[0].contiguous(), window[1].contiguous())):
        for mask_label, m_ in (("strided mask", window[2]), ("contiguous mask", window[2].contiguous())):
            for gqa in (True, False):
                kk, vv = (k_, v_) if gqa else (k_.repeat_interleave(4, 1), v_.repeat_interleave(4, 1))
                diff = twice(lambda: F.scaled_dot_product_attention(query, kk, vv, attn_mask=m_,
                                                                    enable_gqa=gqa))
                print(f"sdpa {kv_label}, {mask_label}, enable_gqa={gqa}: {diff:.3g}")

if __name__ == "__main__":
    with torch.inference_mode():
        main()
