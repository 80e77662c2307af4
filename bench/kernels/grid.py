"""The benchmark grid: shapes, the kernel combos timed per shape, inputs, the bytes floor."""

from __future__ import annotations

import torch

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
RANKS = [16, 64]
TOKENS = [1, 16, 64, 256, 1024, 4096]
ADAPTERS = [1, 8, 32]
DECODE_MAX_TOKENS = 64
FUSED_MAX_TOKENS = 256  # the fused kernel is timed up to here
CANDIDATE = "NVIDIA_H200_candidate"  # kernels/configs/<CANDIDATE>.json
# column -> (fused, kernels.launch.Variant spec); 'unfused' / 'fused' are plain
COMBOS = {
    "unfused": (False, "plain"), "fused": (True, "plain"),
    "unfused_rec": (False, "rec"), "unfused_pdl": (False, "pdl"),
    "unfused_rec_pdl": (False, "rec+pdl"), "fused_rec": (True, "rec"),
    "unfused_cand": (False, f"plain@{CANDIDATE}"), "fused_cand": (True, f"plain@{CANDIDATE}"),
}
# vLLM 0.33 Triton lora_shrink + lora_expand on an H200, from shared/ANCHORS.md (bf16, graph
# replay, median, µs): an anchor, NOT measured by this script (no vLLM on the GPU machine).
VLLM_ANCHOR = {(4096, 4096, 16, 1, 1): 7.7, (4096, 4096, 16, 16, 8): 9.2,
               (4096, 4096, 16, 64, 32): 21.9, (4096, 4096, 16, 1024, 8): 21.1,
               (4096, 4096, 16, 4096, 32): 118.9, (4096, 4096, 64, 64, 32): 45.4,
               (4096, 4096, 64, 4096, 32): 163.6, (4096, 14336, 16, 4096, 32): 310.3,
               (4096, 14336, 64, 64, 32): 71.0, (14336, 4096, 16, 16, 8): 9.4,
               (14336, 4096, 64, 4096, 32): 248.6}


def cases(shapes, ranks, tokens, adapters):
    """(K, N, rank, tokens, adapters), skipping more adapters than tokens."""
    return [(k, n, r, t, a) for (k, n) in shapes for r in ranks for t in tokens for a in adapters
            if a <= t]


def make_inputs(k, n, rank, tokens, adapters, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = rnd(tokens, k).to(dtype)
    lora_a = (rnd(adapters, rank, k) / k ** 0.5).to(dtype)
    lora_b = (rnd(adapters, n, rank) / rank ** 0.5).to(dtype)
    y = rnd(tokens, n).to(dtype)
    slot_ids = (torch.arange(tokens, device=device) % adapters).to(torch.int32)
    return y, x, lora_a, lora_b, slot_ids



def floor_bytes(k, n, rank, tokens, adapters, elem=2):
    active = min(tokens, adapters)
    return elem * (tokens * k + active * rank * (k + n) + 2 * tokens * n)


def combos_for(tokens: int, k, n, rank, adapters, gpu: str) -> dict:
    """COMBOS that apply to a shape: fused up to FUSED_MAX_TOKENS; the candidate table only
    where its launch configs differ from the GPU's own (else it runs the same kernels)."""
    out = {}
    for col, (fused, spec) in COMBOS.items():
        if fused and tokens > FUSED_MAX_TOKENS:
            continue
        if spec.endswith(CANDIDATE) and same_configs(gpu, CANDIDATE, k, n, rank, tokens,
                                                     adapters, fused):
            continue
        out[col] = (fused, spec)
    return out


def same_configs(gpu: str, table: str, k, n, rank, tokens, adapters, fused: bool) -> bool:
    from kernels import launch
    if fused:
        get = lambda name: launch.fused_launch(name, 132, tokens, adapters, k, n, rank, 1)  # noqa
    else:
        get = lambda name: (launch.shrink_launch(name, 132, tokens, adapters, k, rank, 1),  # noqa
                            launch.expand_launch(name, tokens, n, rank))
    return get(gpu) == get(table)



def case_key(row: dict) -> tuple:
    return row["k"], row["n"], row["rank"], row["tokens"], row["adapters"]


def combo_column(fused: bool, records: bool, pdl: bool) -> str:
    if fused:
        return "fused_rec" if records else "fused"
    return "unfused" + ("_rec" if records else "") + ("_pdl" if pdl else "")


def pick_ours(row: dict, gpu: str) -> None:
    """'ours' = what the host rules (kernels/configs/<gpu>.json: fused_when, records_when,
    pdl_when) pick for this shape, from the columns this row has."""
    from kernels import launch
    shape = (row["tokens"], row["adapters"], row["rank"], row["k"])
    fused = row.get("fused_us") is not None and launch.use_fused(gpu, *shape)
    variant = launch.pick_variant(gpu, *shape)
    col = combo_column(fused, variant.records, variant.pdl and not fused)
    col = col if row.get(col + "_us") is not None else "fused" if fused else "unfused"
    row["auto_is_fused"], row["ours_column"] = fused, col
    row["ours_us"] = row[col + "_us"]


