"""The "## Kernels" section of bench/RESULTS.md from a run's JSON: main table and summary."""

from __future__ import annotations

import math
from pathlib import Path

from bench.kernels.grid import (
    DECODE_MAX_TOKENS,
    VLLM_ANCHOR,
    case_key,
    floor_bytes,
    pick_ours,
)
from bench.kernels.variants import cell, variant_section


def verdict(row, one_launch):
    best_torch = min(row["gather_bmm_us"], row["loop_us"])
    if row["tokens"] <= DECODE_MAX_TOKENS:
        ok = row["ours_us"] <= 2 * row["floor_us"] + one_launch and \
            row["gather_bmm_us"] >= 3 * row["ours_us"]
    else:
        ok = row["ours_us"] <= best_torch
    return "yes" if ok else "no"


HEADER = ("| K→N | rank | tokens | adapters | floor | ours | fused | unfused | gather-bmm | loop "
          "| base linear | ours/floor | target met | vLLM (anchor) |")


def format_row(row, one_launch):
    return (f"| {row['k']}→{row['n']} | {row['rank']} | {row['tokens']} | {row['adapters']} | "
            f"{cell(row['floor_us'])} | {cell(row['ours_us'])} | {cell(row.get('fused_us'))} | "
            f"{cell(row['unfused_us'])} | {cell(row['gather_bmm_us'])} | {cell(row['loop_us'])} | "
            f"{cell(row['base_linear_us'])} | {row['ours_us'] / row['floor_us']:.1f} | "
            f"{verdict(row, one_launch)} | {cell(VLLM_ANCHOR.get(case_key(row)))} |")


def summary(rows, one_launch) -> list[str]:
    if not rows:
        return ["- No timings in this run."]
    decode = [r for r in rows if r["tokens"] <= DECODE_MAX_TOKENS]
    prefill = [r for r in rows if r["tokens"] > DECODE_MAX_TOKENS]
    met = lambda rs: sum(verdict(r, one_launch) == "yes" for r in rs)  # noqa: E731
    near = sum(r["ours_us"] <= 2 * r["floor_us"] + one_launch for r in decode)
    vs_bmm = [r["gather_bmm_us"] / r["ours_us"] for r in decode]
    vs_best = [min(r["gather_bmm_us"], r["loop_us"]) / r["ours_us"] for r in prefill]
    anchors = [VLLM_ANCHOR[case_key(r)] / r["ours_us"] for r in rows if case_key(r) in VLLM_ANCHOR]
    fast = sum(v >= 3 for v in vs_bmm)
    lo, hi = lambda v: min(v, default=math.nan), lambda v: max(v, default=math.nan)  # noqa
    overhead = ", ".join(
        f"{r['k']}→{r['n']} r{r['rank']} {100 * r['ours_us'] / r['base_linear_us']:.0f}%"
        for r in decode if r["tokens"] == 16 and r["adapters"] == 8)
    return [
        f"- Decode (≤ {DECODE_MAX_TOKENS} tokens): {met(decode)}/{len(decode)} rows meet both "
        f"targets; {near}/{len(decode)} within 2× floor + one launch; {fast}/{len(decode)} "
        f"≥ 3× faster than gather-bmm (range {lo(vs_bmm):.1f}–{hi(vs_bmm):.1f}×).",
        f"- LoRA time as a share of the base linear layer at 16 tokens over 8 adapters "
        f"(ANCHORS goal ≤ 30%): {overhead}.",
        f"- Prefill: {met(prefill)}/{len(prefill)} rows at least as fast as the best torch "
        f"baseline (best-torch / ours {lo(vs_best):.2f}–{hi(vs_best):.1f}×).",
        f"- Against the vLLM anchors (shared/ANCHORS.md, measured earlier on an H200, not in "
        f"this run): vLLM / ours {min(anchors):.2f}–{max(anchors):.1f}× on the "
        f"{len(anchors)} matching rows." if anchors else "- No vLLM anchor rows matched.",
    ]


ANCHOR_BANDWIDTH = 4.28e12  # shared/ANCHORS.md's copy bandwidth on an H200


def render(result: dict) -> str:
    t = result["timings"]
    c = result["correctness"]
    # The stricter (higher) of the measured and the anchors' bandwidth sets the floor.
    bandwidth = max(t["bandwidth"], ANCHOR_BANDWIDTH)
    for row in t["rows"]:
        pick_ours(row, result["gpu"])
        row["floor_us"] = floor_bytes(row["k"], row["n"], row["rank"], row["tokens"],
                                      row["adapters"]) / bandwidth * 1e6
    graphs = result.get("graph_check")
    graph_text = (f"{sum(g['ok'] for g in graphs)}/{len(graphs)} match the reference"
                  if graphs else "not part of this run (see bench/kernels_notes.md)")
    if t.get("truncated"):
        graph_text += f"; TIMINGS INCOMPLETE ({len(t['rows'])} rows, the run hit its deadline)"
    lines = [
        "## Kernels",
        "",
        f"GPU: {result['gpu']} (torch {result['torch']}, triton {result['triton']}), produced by "
        f"`python -m bench.kernels`. bf16, CUDA-graph replay, median, µs. Tokens spread evenly over "
        f"the adapters; weights cache-warm. Floor = bytes (x + active A and B + y read and "
        f"written) over {bandwidth / 1e12:.2f} TB/s, the higher of this run's measured "
        f"device-to-device copy ({t['bandwidth'] / 1e12:.2f} TB/s) and the anchors' 4.28 TB/s "
        f"(the stricter floor); one minimal kernel launch costs "
        f"{t['launch_us']:.1f} µs in graph replay. 'ours' = what the host rule in "
        f"kernels/configs/ picks between 'fused' (one launch) and 'unfused' (shrink + expand; "
        f"fused is timed up to 256 tokens). 'loop' = torch per-adapter "
        f"loop, 'gather-bmm' = vLLM's torch path. Targets: ≤ {DECODE_MAX_TOKENS} tokens within "
        f"2× floor + one launch and ≥ 3× faster than gather-bmm; prefill ≤ best torch. "
        f"'vLLM (anchor)' is copied from shared/ANCHORS.md: vLLM 0.33's kernels measured "
        f"earlier on an H200, NOT measured here (vLLM is not installed on the GPU machine).",
        "",
        f"GPU correctness before timing: {c['checks']} checks against the torch reference, "
        f"{len(c['failures'])} failures, worst bf16 relative error {c['worst_bf16_rel_err']:.1e}; "
        f"CUDA-graph replay (3 replays of a captured add_lora, fused and unfused, each "
        f"variant where the run had variants): "
        f"{graph_text}.",
        "",
        *summary(t["rows"], t["launch_us"]),
        "",
        HEADER,
        "|" + "---|" * 14,
    ]
    lines += [format_row(r, t["launch_us"]) for r in t["rows"]]
    lines += variant_section(t["rows"])
    return "\n".join(lines) + "\n"


def write_section(results_path: Path, section: str) -> None:
    """Replace (or append) the '## Kernels' section of RESULTS.md, leaving other sections."""
    text = results_path.read_text() if results_path.exists() else "# Benchmark results\n\n"
    start = text.find("## Kernels")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if nxt < 0 else text[nxt:])
    results_path.write_text(text)
