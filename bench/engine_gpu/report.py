"""The result's overheads, agreement checks and markdown table."""

from __future__ import annotations

from bench.engine_gpu.engine import MODE_LABELS


def overhead(base: dict, mixed: dict) -> float:
    """Throughput lost to LoRA, in percent of the base model's tokens/s."""
    return 100.0 * (1.0 - mixed["tokens_per_s"] / base["tokens_per_s"])


def same_rows(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


def render(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    ours, hf = result["loramix"], result["transformers"]
    shape = (f"hidden {cfg['hidden']}, {cfg['layers']} layers, {cfg['heads']} heads, "
             f"{cfg['kv_heads']} KV heads, intermediate {cfg['intermediate']}, "
             f"vocab {cfg['vocab']}, {cfg['dtype']}")
    lines = [
        f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, triton {env['triton']}; LocalEngine kernel backend "
        f"`{env['kernel_backend']}`. Random Llama-1B-shaped model ({shape}); "
        f"{cfg['requests']} requests, prompt {cfg['prompt']} tokens, {cfg['new_tokens']} new "
        f"tokens, greedy, EOS ignored; {cfg['adapters']} random rank-{cfg['rank']} adapters on "
        f"all seven projections ({cfg['requests'] // cfg['adapters']} requests each). "
        "Median of the timed runs after a warm-up.",
        "",
        "| system | batch | output tok/s (median) | timed runs, tok/s | LoRA overhead (tok/s lost vs base) |",
        "|---|---|---|---|---|",
    ]
    rows = []
    for mode, run in result.get("loramix_modes", {result.get("mode", "eager"): ours}).items():
        system = f"loramix LocalEngine, {MODE_LABELS.get(mode, mode)}"
        rows += [(system, "base model only", run["base"], None),
                 (system, f"{cfg['adapters']} adapters mixed", run["mixed"],
                  overhead(run["base"], run["mixed"]))]
    rows += [
        ("transformers `generate`", "base model only", hf["base"], None),
        ("transformers + peft `generate` (`adapter_names`)", f"{cfg['adapters']} adapters mixed",
         hf["mixed"], result["overhead_percent"]["peft"]),
    ]
    for system, batch, stats, lost in rows:
        runs = ", ".join(f"{r['tokens_per_s']:.0f}" for r in stats["runs"])
        cell = "" if lost is None else f"**−{lost:.1f}%**" if lost >= 0 else f"+{-lost:.1f}%"
        lines.append(f"| {system} | {batch} | {stats['tokens_per_s']:,.0f} | {runs} | {cell} |")
    return "\n".join(lines)
