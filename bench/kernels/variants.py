"""The A/B table of kernel variants and candidate configs against the plain kernels, and the
host rules the data supports."""

from __future__ import annotations

import json
import math
import statistics

from bench.kernels.grid import CANDIDATE, DECODE_MAX_TOKENS, combo_column


def cell(us: float | None) -> str:
    """A table cell of microseconds ('-' where not measured)."""
    return "-" if us is None else f"{us:.1f}"


AB_COLUMNS = [("unfused", "pair plain"), ("unfused_again", "pair plain again"),
              ("unfused_rec", "pair rec"), ("unfused_pdl", "pair pdl"),
              ("unfused_rec_pdl", "pair rec+pdl"), ("fused", "fused plain"),
              ("fused_rec", "fused rec"), ("unfused_cand", "pair cand"),
              ("fused_cand", "fused cand")]
VARIANT_BASE = {"unfused_rec": "unfused", "unfused_pdl": "unfused",
                "unfused_rec_pdl": "unfused", "fused_rec": "fused",
                "unfused_cand": "unfused", "fused_cand": "fused"}
TOKEN_CLASSES = [("≤ 64 tokens", 1, DECODE_MAX_TOKENS), ("65–256", 65, 256),
                 ("≥ 257", 257, 1 << 30)]


def _geo(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def _ratios(rows, col, base, lo=1, hi=1 << 30) -> list[float]:
    return [r[col + "_us"] / r[base + "_us"] for r in rows if lo <= r["tokens"] <= hi
            and r.get(col + "_us") is not None and r.get(base + "_us") is not None]


def noise(rows) -> tuple[float, float]:
    """(median, max) of |plain again / plain - 1| over the decode rows: the spread of equal versions."""
    spread = [abs(v - 1) for v in _ratios(rows, "unfused_again", "unfused")]
    return (statistics.median(spread), max(spread)) if spread else (float("nan"),) * 2


def variant_section(rows) -> list[str]:
    """A/B table of the kernel variants and candidate configs against plain, same run."""
    if not any(r.get("unfused_rec_us") is not None for r in rows):
        return []
    med, top = noise(rows)
    lines = ["", "### Kernel variants and candidate configs (A/B against plain, same run)", "",
             f"Variants of the same kernels (kernels/launch.py `Variant`): 'rec' = one-record "
             f"tile metadata, 'pdl' = programmatic dependent launch of the expand, 'cand' = "
             f"kernels/configs/{CANDIDATE}.json (timed only where its configs differ). "
             f"Spread of equal versions (plain timed twice, decode rows): median "
             f"{100 * med:.1f}%, max {100 * top:.1f}%. Ratio = variant / plain of the same path "
             f"(< 1 = faster), geomean [min–max] over the rows:", ""]
    lines.append("| variant | " + " | ".join(c[0] for c in TOKEN_CLASSES) + " |")
    lines.append("|---|" + "---|" * len(TOKEN_CLASSES))
    for col, base in VARIANT_BASE.items():
        cells = []
        for _, lo, hi in TOKEN_CLASSES:
            ratios = _ratios(rows, col, base, lo, hi)
            cells.append(f"{_geo(ratios):.3f} [{min(ratios):.2f}–{max(ratios):.2f}] "
                         f"n={len(ratios)}" if ratios else "-")
        lines.append(f"| {dict(AB_COLUMNS)[col]} | " + " | ".join(cells) + " |")
    lines += ["", "| K→N | rank | tokens | adapters | " + " | ".join(c[1] for c in AB_COLUMNS)
              + " |", "|" + "---|" * (4 + len(AB_COLUMNS))]
    for r in rows:
        lines.append(f"| {r['k']}→{r['n']} | {r['rank']} | {r['tokens']} | {r['adapters']} | "
                     + " | ".join(cell(r.get(c + "_us")) for c, _ in AB_COLUMNS) + " |")
    return lines + ["", *proposal(rows)]


def proposal(rows) -> list[str]:
    """Host rules the data supports: per token count, a variant is adopted for the path the
    current rules pick when its geomean beats plain by more than the margin and no row loses
    more than the margin (margin = max(3%, 2x the median spread of equal versions))."""
    med, _ = noise(rows)
    margin = max(0.03, 2 * med) if med == med else 0.03
    wins = {"records_when": [], "pdl_when": []}
    lines = [f"Rules the data supports (margin {100 * margin:.1f}%), per token count, for the "
             f"path the current fused_when picks:", ""]
    for t in sorted({r["tokens"] for r in rows}):
        at = [r for r in rows if r["tokens"] == t]
        best = ("plain", 1.0, 1.0)
        for rec, pdl in ((True, False), (False, True), (True, True)):
            ratios = []
            for r in at:
                fused = r.get("auto_is_fused", False)
                if pdl and fused:
                    ratios.append(1.0)  # PDL does not apply to the single fused launch
                    continue
                col, base = combo_column(fused, rec, pdl), "fused" if fused else "unfused"
                if r.get(col + "_us") and r.get(base + "_us"):
                    ratios.append(r[col + "_us"] / r[base + "_us"])
            if ratios and _geo(ratios) < min(best[1], 1 - margin) and max(ratios) < 1 + margin:
                best = ("+".join(n for n, on in (("rec", rec), ("pdl", pdl)) if on),
                        _geo(ratios), max(ratios))
        lines.append(f"- {t} tokens: {best[0]}" + (f" (geomean {best[1]:.3f}, worst row "
                                                    f"{best[2]:.3f})" if best[0] != "plain" else ""))
        if "rec" in best[0]:
            wins["records_when"].append(t)
        if "pdl" in best[0]:
            wins["pdl_when"].append(t)
    present = sorted({r["tokens"] for r in rows})
    rules = {key: _token_ranges(ts, present) for key, ts in wins.items() if ts}
    lines += ["", "Proposed additions to kernels/configs/NVIDIA_H200.json: `"
              + json.dumps(rules) + "`" if rules else "No variant clears the margin: keep plain."]
    return lines


def _token_ranges(winners: list[int], present: list[int]) -> list[dict]:
    """Contiguous runs of the measured token counts as min_tokens/max_tokens rules."""
    out, prev = [], 0
    for t in present:
        if t in winners:
            if out and out[-1]["max_tokens"] == prev:
                out[-1]["max_tokens"] = t
            else:
                out.append({"min_tokens": prev + 1, "max_tokens": t})
        prev = t
    return out
