"""Merge quality on the skill lab: exact match of merged skills on each skill's held-out test.

Rows: the base; each skill alone (the upper bound); then, for merges of 2, 3 and 4 skills,
every method at weights 1/N: `linear`, `cat`, `ties`, `dare_ties`, `svd`, `lego` with its
defaults, LEGO option variants and ranks k, learned CAT (per-module weights from
`merging.tune_cat` on the skills' own training data) and the data-mixing baseline (a LoRA
trained on the merged skills' mixed data, `lab/assets/baselines/mix-<a>-<b>...`, made by
`python -m lab.train --mixes-only`). Tasks: each
merged skill's test set, plus the composite reverse_upper ("reverse upper: abc =>" -> " CBA",
never trained) wherever reverse and upper are both merged. CPU, float32, greedy.

    python -m bench.quality --quick                  # 40 examples per task
    python -m bench.quality --json bench/results/quality_cpu.json   # 200 per task, all rows
    python -m bench.quality --quick --only sort+add  # rows whose "merge | method" has the text
    python -m bench.quality --render bench/results/quality_cpu.json # table of a saved run

The base model is wrapped by peft once, with one LoRA slot per projection; each row's adapter
(scaling folded in, zero-padded to the slot's rank) is written into the slots, so no row reloads
the model, and every task of a row is decoded in one batched pass.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.adapter_slots import AdapterSlots
from lab.compose import ASSETS, load_base
from lab.data import mix_name, mixed_examples
from lab.evaluate import score
from lab.learned_cat import tune_cat
from lab.world import heldout_set
from merging import AdapterError, LoraAdapter, load_adapter, merge

SKILLS = ("reverse", "upper", "sort", "add")
COMPOSITE = "reverse_upper"
MERGES = (
    ("reverse", "upper"),
    ("sort", "add"),
    ("reverse", "upper", "sort"),
    ("upper", "sort", "add"),
    SKILLS,
)
BASIC_METHODS = ("linear", "cat", "ties", "dare_ties", "svd", "lego", "knots", "core")
# LEGO options changed one at a time from the defaults (direction, l2, none), at the default k.
# Output reweighting, sqrt(r/k), is 1 at the default k = r: it is tried at k = r/2 and k = Σ r_i.
LEGO_VARIANTS = (
    {"features": "raw"},
    {"param_reweight": "maxabs"},
    {"param_reweight": "none"},
)
FULL_COUNT, QUICK_COUNT = 200, 40
TUNE_PER_SKILL, TUNE_SEED = 256, 5  # learned CAT: examples per skill from train_stream(task, seed=5)
BASELINES = ASSETS / "baselines"


class NotAvailable(Exception):
    """A row that cannot be measured in this checkout; its message is what the table shows."""


@dataclass(frozen=True)
class Row:
    """One line of the table: what is loaded into the base model and which tasks are scored."""

    merge: str  # "-" (base), a skill (skill alone) or "a+b+..." (merged skills)
    method: str  # the label in the table
    source: str  # "base", "skill", "merge", "learned_cat" or "data_mix"
    skills: tuple[str, ...] = ()
    merge_method: str | None = None
    rank: int | None = None
    options: dict = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        return f"{self.merge} | {self.method}"

    def tasks(self) -> list[str]:
        """Tasks scored: every skill's and the composite for base and single skills, else the
        merged skills' own plus the composite where reverse and upper are both merged."""
        names = SKILLS if self.source in ("base", "skill") else self.skills
        both = self.source in ("base", "skill") or {"reverse", "upper"} <= set(names)
        return [*names, COMPOSITE] if both else list(names)

    def members(self) -> list[str]:
        """The tasks of the mean column."""
        return list(SKILLS) if self.source == "base" else list(self.skills)


def _lego_ranks(ranks: list[int]) -> list[tuple[int, str]]:
    """(k, label) for LEGO beyond its default k = max rank: half, twice, and all units (Σ r_i)."""
    top, total = max(ranks), sum(ranks)
    picked = {}
    for k, name in ((top // 2, ""), (2 * top, ""), (total, " (all)")):
        k = min(k, total)
        picked[k] = " (all)" if k == total else name
    picked.pop(top, None)
    return [(k, f"lego k={k}{name}") for k, name in sorted(picked.items())]


def merge_rows(names: tuple[str, ...], ranks: dict[str, int]) -> list[Row]:
    """Every row of one merge, in table order."""
    merge_name = "+".join(names)
    rows = [Row(merge_name, m, "merge", names, m) for m in BASIC_METHODS]
    for variant in LEGO_VARIANTS:
        label = "lego " + ", ".join(f"{k}={v}" for k, v in variant.items())
        rows.append(Row(merge_name, label, "merge", names, "lego", options=variant))
    lego_ranks = _lego_ranks([ranks[n] for n in names])
    for k, label in lego_ranks:
        rows.append(Row(merge_name, label, "merge", names, "lego", rank=k))
    for k, label in (lego_ranks[0], lego_ranks[-1]):  # half, all
        rows.append(Row(merge_name, label + ", output_reweight=sqrt", "merge", names, "lego", rank=k,
                        options={"output_reweight": "sqrt"}))
    rows.append(Row(merge_name, "cat (learned)", "learned_cat", names, "cat"))
    rows.append(Row(merge_name, "data mix", "data_mix", names))
    return rows


def plan(ranks: dict[str, int], merges=MERGES) -> list[Row]:
    """All rows: base, each skill alone, then each merge's rows."""
    rows = [Row("-", "base", "base")]
    rows += [Row(s, "skill alone", "skill", (s,)) for s in SKILLS]
    for names in merges:
        rows += merge_rows(tuple(names), ranks)
    return rows


def learn_cat(model, tokenizer, adapters: list[LoraAdapter], names: tuple[str, ...]):
    """TuneResult of learned CAT on `TUNE_PER_SKILL` training examples of each merged skill."""
    examples = mixed_examples(list(names), TUNE_PER_SKILL, seed=TUNE_SEED)
    return tune_cat(model, tokenizer, adapters, examples, seed=0)


def data_mix(names: tuple[str, ...]) -> LoraAdapter:
    path = BASELINES / mix_name(names)
    if not path.is_dir():
        raise NotAvailable("n/a (not trained)")
    try:
        return load_adapter(path)
    except AdapterError as exc:
        raise NotAvailable(f"n/a ({exc})") from None


def build(row: Row, skills: dict[str, LoraAdapter], learned: dict) -> tuple[LoraAdapter | None, dict]:
    """The adapter a row loads (None: the base) and what to record about it."""
    if row.source == "base":
        return None, {}
    if row.source == "skill":
        return skills[row.merge], {}
    if row.source == "data_mix":
        return data_mix(row.skills), {}
    adapters = [skills[n] for n in row.skills]
    info, module_weights = {}, None
    if row.source == "learned_cat":
        tuned = learned[row.skills]
        if isinstance(tuned, NotAvailable):
            raise tuned
        module_weights, info = tuned.module_weights, {"tune": tuned.info}
    result = merge(adapters, None, row.merge_method, row.rank, names=list(row.skills),
                   options=row.options, module_weights=module_weights)
    return result.adapter, {**info, "merge_seconds": result.info["seconds"],
                            "relative_error": result.info["relative_error"]}


def run(rows: list[Row], count: int, *, assets: Path = ASSETS, progress=None) -> list[dict]:
    """Score `rows` on `count` held-out examples per task; one dict per row (see `record`)."""
    model, tokenizer = load_base(assets / "base")
    skills = {s: load_adapter(assets / "skills" / s) for s in SKILLS}
    test = {t: heldout_set(t, count) for t in [*SKILLS, COMPOSITE]}
    learned = {}
    for row in rows:  # tuned on the bare base, before it is wrapped
        if row.source == "learned_cat" and row.skills not in learned:
            try:
                learned[row.skills] = learn_cat(model, tokenizer, [skills[n] for n in row.skills], row.skills)
            except NotAvailable as exc:
                learned[row.skills] = exc
            if progress:
                progress({"merge": row.merge, "method": "tuned", "mean": None, "seconds": getattr(
                    learned[row.skills], "info", {}).get("seconds", 0.0)})
    targets = sorted({m.rsplit(".", 1)[-1] for a in skills.values() for m in a.modules})
    slots = AdapterSlots(model, targets)
    records = []
    for row in rows:
        started = time.perf_counter()
        try:
            adapter, info = build(row, skills, learned)
        except NotAvailable as exc:
            records.append(record(row, {}, None, 0.0, 0, {"note": str(exc)}))
            continue
        slots.load(adapter)
        tasks = row.tasks()
        accs = score(slots.model, tokenizer, {t: test[t] for t in tasks})
        rank = adapter.max_rank if adapter else None
        records.append(record(row, accs, rank, time.perf_counter() - started, count * len(tasks), info))
        if progress:
            progress(records[-1])
    slots.release()
    return records


def record(row: Row, accs: dict, rank, seconds: float, examples: int, info: dict) -> dict:
    members = row.members()
    mean = sum(accs[m] for m in members) / len(members) if accs else None
    return {"merge": row.merge, "method": row.method, "rank": rank, "scores": accs, "mean": mean,
            "seconds": seconds, "examples": examples, **info}


def table(records: list[dict]) -> str:
    """Markdown table of row records (n/a rows show their note)."""
    cols = [*SKILLS, COMPOSITE]
    lines = ["| merge | method | rank | " + " | ".join(cols) + " | mean (merged skills) |",
             "|---|---|---|" + "---|" * (len(cols) + 1)]
    for rec in records:
        if rec.get("note"):
            cells = [rec["note"]] + [""] * len(cols)
        else:
            cells = [f"{rec['scores'][c]:.2f}" if c in rec["scores"] else "" for c in cols] + [f"{rec['mean']:.2f}"]
        rank = "" if rec["rank"] is None else str(rec["rank"])
        lines.append(f"| {rec['merge']} | {rec['method']} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(run_info: dict) -> str:
    return (f"Skill lab merge quality: {run_info['count']} held-out examples per task, exact match, "
            f"greedy, float32; {run_info['platform']}; {run_info['seconds']:.0f} s. Weights 1/N; "
            f"each method's default rank (largest input rank; cat: sum of ranks) unless k is given.")


def estimate_full(records: list[dict], full_rows: list[Row]) -> float:
    """Seconds a full run (every row, FULL_COUNT per task) would take, from this run's rates."""
    scored = [r for r in records if r["examples"]]
    merging = [r.get("merge_seconds", 0.0) for r in scored]
    per_example = (sum(r["seconds"] for r in scored) - sum(merging)) / max(1, sum(r["examples"] for r in scored))
    per_merge = sum(merging) / max(1, sum(1 for r in scored if "merge_seconds" in r))
    tunes = [r["tune"]["seconds"] for r in scored if "tune" in r]
    per_tune = sum(tunes) / len(tunes) if tunes else 0.0
    examples = sum(FULL_COUNT * len(row.tasks()) for row in full_rows)
    num_merges = sum(1 for row in full_rows if row.source in ("merge", "learned_cat"))
    num_tunes = len({row.skills for row in full_rows if row.source == "learned_cat"})
    return examples * per_example + num_merges * per_merge + num_tunes * per_tune


def platform_name() -> str:
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores, torch {torch.__version__})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None, help=f"examples per task (default {FULL_COUNT})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_COUNT} examples per task")
    parser.add_argument("--only", default=None, help="only rows whose 'merge | method' contains this text "
                        "(the base row is always kept)")
    parser.add_argument("--json", type=Path, default=None, help="write every row and the run's facts here")
    parser.add_argument("--update", action="store_true", help="with --json: replace only the rows measured "
                        "now in the saved file (e.g. --only 'data mix' once the baselines exist)")
    parser.add_argument("--render", type=Path, default=None, help="print the table of a saved --json run")
    args = parser.parse_args(argv)
    if args.render:
        saved = json.loads(args.render.read_text())
        print(header(saved))
        for later in saved.get("updates", []):
            print(f"{len(later['rows'])} rows measured in a later run ({later['seconds']:.0f} s): "
                  + "; ".join(later["rows"]))
        print(table(saved["rows"]))
        return
    count = args.count or (QUICK_COUNT if args.quick else FULL_COUNT)
    ranks = {s: load_adapter(ASSETS / "skills" / s).max_rank for s in SKILLS}
    full_rows = plan(ranks)
    rows = [r for r in full_rows if r.source == "base" or not args.only or args.only in r.label]
    started = time.time()
    records = run(rows, count, progress=lambda r: print(
        f"  {r['merge']} | {r['method']}: " + ("" if r["mean"] is None else f"mean {r['mean']:.2f} ")
        + f"({r['seconds']:.1f} s)", file=sys.stderr))
    run_info = {"count": count, "seconds": time.time() - started, "platform": platform_name(), "rows": records}
    print(header(run_info))
    print(table(records))
    estimate = estimate_full(records, full_rows)
    untimed = "" if any("tune" in r for r in records) else " plus learned-CAT tuning (not timed in this run)"
    print(f"\nEstimated full run ({FULL_COUNT} per task, {len(full_rows)} rows) on this machine: "
          f"~{estimate / 60:.0f} min{untimed}")
    if args.json:
        saved = {**run_info, "estimated_full_seconds": estimate}
        if args.update:
            saved = update(json.loads(args.json.read_text()), run_info, full_rows)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(saved, indent=1) + "\n")


def update(saved: dict, new: dict, full_rows: list[Row]) -> dict:
    """`saved` with the rows of `new` put in (same count only), in table order; saved rows that
    are no longer in the plan are dropped (and listed)."""
    if saved["count"] != new["count"]:
        sys.exit(f"--update: the saved run has {saved['count']} examples per task, this one {new['count']}")
    order = {(row.merge, row.method): i for i, row in enumerate(full_rows)}
    rows = {(r["merge"], r["method"]): r for r in saved["rows"]}
    rows.update({(r["merge"], r["method"]): r for r in new["rows"] if r["method"] != "base"})
    dropped = [" | ".join(key) for key in rows if key not in order]
    ordered = sorted((r for key, r in rows.items() if key in order), key=lambda r: order[(r["merge"], r["method"])])
    updated = {"platform": new["platform"], "seconds": new["seconds"], "dropped": dropped,
               "rows": [f"{r['merge']} | {r['method']}" for r in new["rows"] if r["method"] != "base"]}
    return {**saved, "rows": ordered, "updates": saved.get("updates", []) + [updated]}


if __name__ == "__main__":
    main()
