"""Merge quality on the real model (SmolLM2-135M-Instruct and the skills of lab/real): accuracy
with a 95 % Wilson interval on every single and composite task, greedy, exact checkers.

Rows: the base; each skill alone; the data-mixing baseline (one LoRA trained here on all five
skills' data, `lab.real.train --skill mixed`); then, for each composite task's skill pair and for
all five skills, every method of merging's registry at weights 1/N (read at run time, so a new
method gets its row), `cat` at weight 1 per skill, LEGO option variants and ranks k, and
learned CAT (lab.learned_cat, tuned on a mix of the skills' training data, chat-rendered).
A pair's rows score its two skills' tasks and its composite task; every other row scores all
nine tasks.

    python -m bench.real_quality --skills DIR --out quality.json --device cuda     # the table (H200: minutes)
    python -m bench.real_quality --render quality.json                           # markdown of a saved run
    python -m bench.real_quality --combine q1.json q2.json --out all.json        # runs cut short, as one

One process: the base model is loaded once; merges run on CPU threads while the GPU trains the
mixed LoRA, tunes CAT and scores; each row's adapter goes into peft LoRA slots
(bench.adapter_slots); all prompts of a row are decoded in left-padded batches.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import torch

from bench.adapter_slots import AdapterSlots
from lab.real.checks import is_correct
from lab.real.data import (
    COMPOSITE_SKILLS,
    MIXED,
    SKILLS,
    TASKS,
    eval_set,
    mixed_examples,
)
from lab.real.evaluate import MAX_NEW_TOKENS, greedy_replies, wilson_interval
from merging import METHODS, LoraAdapter, load_adapter, merge

ALL = "+".join(SKILLS)
# LEGO options changed one at a time from the defaults (direction, l2, none), at the default k.
LEGO_VARIANTS = ({"features": "raw"}, {"param_reweight": "maxabs"}, {"param_reweight": "none"})
TUNE_PER_SKILL, TUNE_SEED = 128, 7  # learned CAT: examples per merged skill, train split, its own seed
NUM_SAMPLES = 3  # replies kept per task and row


@dataclass(frozen=True)
class Row:
    """One line of the table: what is loaded into the base model and which tasks are scored."""

    merge: str  # "-" (base), a skill, "mixed", or "a+b" (merged skills)
    method: str  # the label in the table
    source: str  # "base", "skill", "mixed", "merge" or "learned_cat"
    skills: tuple[str, ...] = ()
    tasks: tuple[str, ...] = TASKS
    merge_method: str | None = None
    rank: int | None = None
    weights: tuple[float, ...] | None = None  # None: 1/N
    options: dict = field(default_factory=dict, hash=False)


def merges() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(skills, tasks scored) of every merge: each composite's pair, then all five skills."""
    pairs = [(skills, (*skills, task)) for task, skills in COMPOSITE_SKILLS.items()]
    return pairs + [(SKILLS, TASKS)]


def lego_ranks(rank: int, count: int) -> list[tuple[int, str]]:
    """(k, label suffix) for LEGO beyond its default k = rank: half, twice, and all units."""
    total, picked = rank * count, {}
    for k in (rank // 2, 2 * rank, rank * count):
        picked[min(k, total)] = " (all)" if min(k, total) == total else ""
    picked.pop(rank, None)
    return sorted(picked.items())


def merge_rows(skills: tuple[str, ...], tasks: tuple[str, ...], rank: int) -> list[Row]:
    """Every row of one merge, in table order."""
    name, n = "+".join(skills), len(skills)
    common = {"skills": skills, "tasks": tasks}
    rows = [Row(name, "cat (1/N)" if m == "cat" else m, "merge", merge_method=m, **common) for m in METHODS]
    rows.append(Row(name, "cat (weight 1)", "merge", merge_method="cat", weights=(1.0,) * n, **common))
    for variant in LEGO_VARIANTS:
        label = "lego " + ", ".join(f"{k}={v}" for k, v in variant.items())
        rows.append(Row(name, label, "merge", merge_method="lego", options=variant, **common))
    ks = lego_ranks(rank, n)
    for k, suffix in ks:
        rows.append(Row(name, f"lego k={k}{suffix}", "merge", merge_method="lego", rank=k, **common))
    for k, suffix in (ks[0], ks[-1]):
        rows.append(Row(name, f"lego k={k}{suffix}, output_reweight=sqrt", "merge", merge_method="lego", rank=k,
                        options={"output_reweight": "sqrt"}, **common))
    rows.append(Row(name, "cat (learned)", "learned_cat", merge_method="cat", **common))
    return rows


def plan(rank: int) -> list[Row]:
    """All rows: base, each skill alone, the mixed LoRA, then each merge's rows."""
    rows = [Row("-", "base", "base")]
    rows += [Row(s, "skill alone", "skill", (s,)) for s in SKILLS]
    rows.append(Row(MIXED, f"LoRA on mixed data ({len(SKILLS)} skills)", "mixed", SKILLS))
    for skills, tasks in merges():
        rows += merge_rows(skills, tasks, rank)
    return rows


# --- building each row's adapter ------------------------------------------------------------

@cache
def _skill(skills_dir: Path, name: str) -> LoraAdapter:
    return load_adapter(skills_dir / name, name=name)


def merge_row(row: Row, skills_dir: Path, module_weights: dict | None, out_dir: Path) -> dict:
    """Merge a row's skills as `loramix merge` does (merging.merge, saved as a PEFT directory to
    `out_dir`) and return what to record. Runs in a worker process: merges are CPU work, and
    processes keep them off the GIL of the process that drives the GPU."""
    adapters = [_skill(skills_dir, s) for s in row.skills]
    result = merge(adapters, list(row.weights) if row.weights else None, row.merge_method, row.rank,
                   names=list(row.skills), options=row.options, module_weights=module_weights)
    result.adapter.save(out_dir)
    return {"merge_seconds": result.info["seconds"], "rank": result.info["rank"], "options": result.info["options"],
            "weights": result.info["weights"], "relative_error": result.info["relative_error"]}


def _worker_init() -> None:
    torch.set_num_threads(1)  # one merge per core


def train_mixed(model, tokenizer, base_name: str, steps: int, batch_size: int, save_to: Path | None,
                log) -> tuple[object, LoraAdapter, dict]:
    """The data-mixing baseline: one LoRA trained on all skills' data (lab.real.train's recipe).
    Returns `model` unwrapped again, the adapter and its training figures."""
    from lab.real.train import TrainConfig, save_adapter, train_skill, with_new_lora

    config = TrainConfig(steps=steps, batch_size=batch_size, eval_size=0)
    peft_model = with_new_lora(model, config)
    figures = train_skill(peft_model, tokenizer, MIXED, config, log)
    with tempfile.TemporaryDirectory() as tmp:
        target = save_to or Path(tmp) / MIXED
        save_adapter(peft_model, target, base_name)
        report = {"skill": MIXED, "config": asdict(config), "training": figures}
        (target / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        adapter = load_adapter(target, name=MIXED)
    return peft_model.unload(), adapter, {**figures, "steps": steps, "batch_size": batch_size}


def tune(model, tokenizer, skills: dict[str, LoraAdapter], names: tuple[str, ...], steps: int):
    """Learned CAT for `names` on TUNE_PER_SKILL training examples of each (bf16 autocast on CUDA)."""
    from lab.learned_cat import tune_cat

    examples = [(e.prompt, e.completion) for e in mixed_examples(names, TUNE_PER_SKILL * len(names), TUNE_SEED)]
    device = next(model.parameters()).device
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return tune_cat(model, tokenizer, [skills[n] for n in names], examples, steps=steps, seed=0, chat=True)


# --- scoring --------------------------------------------------------------------------------

def score(model, tokenizer, tasks: tuple[str, ...], size: int, batch_size: int,
          max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """{task: correct, n, accuracy, ci95, samples} with every task's prompts decoded together."""
    sets = {t: eval_set(t, size) for t in tasks}
    prompts = [e.prompt for t in tasks for e in sets[t]]
    replies = iter(greedy_replies(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens))
    results = {}
    for task in tasks:
        answers = [next(replies) for _ in sets[task]]
        correct = sum(is_correct(task, r, e.expected) for r, e in zip(answers, sets[task]))
        results[task] = {"correct": correct, "n": size, "accuracy": correct / size,
                         "ci95": [round(x, 4) for x in wilson_interval(correct, size)],
                         "samples": [{"prompt": e.prompt, "reply": r}
                                     for e, r in zip(sets[task][:NUM_SAMPLES], answers)]}
    return results


def selected(row: Row, only: list[str] | None) -> bool:
    """Whether `row` is in a run limited to the rows whose "merge | method" has one of `only`."""
    return not only or any(text in f"{row.merge} | {row.method}" for text in only)


def run(args, log=print) -> dict:
    """Every row of the plan (or those matching args.only); the saved run as a dict."""
    from lab.real.train import load_base

    started = time.perf_counter()
    seconds, mixed_info, tuned = {}, None, {}
    model, tokenizer = load_base(args.base, args.device)
    skills = {s: _skill(args.skills, s) for s in SKILLS}
    ranks = {a.max_rank for a in skills.values()}
    if len(ranks) != 1:
        raise ValueError(f"the skills have different ranks {sorted(ranks)}; the LEGO k rows assume one rank")
    rows = [r for r in plan(ranks.pop()) if r.source == "base" or selected(r, args.only)]
    seconds["load"] = time.perf_counter() - started
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(args.merge_workers, mp_context=spawn, initializer=_worker_init) as pool:
        merged = Path(tmp)
        # Merges start now and run while the GPU trains the mixed LoRA and tunes CAT.
        futures: dict[Row, Future] = {r: pool.submit(merge_row, r, args.skills, None, merged / str(i))
                                      for i, r in enumerate(rows) if r.source == "merge"}
        if any(r.source == "mixed" for r in rows):
            t = time.perf_counter()
            model, skills[MIXED], mixed_info = train_mixed(model, tokenizer, args.base.name, args.mixed_steps,
                                                           args.mixed_batch_size, args.save_mixed, log)
            seconds["mixed_training"] = time.perf_counter() - t
            log(f"mixed LoRA: {args.mixed_steps} steps x {args.mixed_batch_size}, final loss "
                f"{mixed_info['final_loss']:.4f}, {seconds['mixed_training']:.0f} s")
        t = time.perf_counter()
        for i, row in enumerate(rows):
            if row.source != "learned_cat":
                continue
            if row.skills not in tuned:
                tuned[row.skills] = tune(model, tokenizer, skills, row.skills, args.tune_steps)
                info = tuned[row.skills].info
                log(f"learned CAT {row.merge}: held-out loss {info['heldout_loss_before']:.3f} -> "
                    f"{info['heldout_loss_after']:.3f} ({info['seconds']:.0f} s)")
            futures[row] = pool.submit(merge_row, row, args.skills, tuned[row.skills].module_weights, merged / str(i))
        seconds["tuning"] = time.perf_counter() - t
        model = model.to(args.dtype)
        targets = sorted({m.rsplit(".", 1)[-1] for a in skills.values() for m in a.modules})
        slots = AdapterSlots(model, targets)
        t, records = time.perf_counter(), []
        for i, row in enumerate(rows):
            adapter, info = None, {}
            if row.source in ("skill", "mixed"):
                adapter = skills[row.merge]
            elif row.source in ("merge", "learned_cat"):
                info = futures.pop(row).result()
                adapter = load_adapter(merged / str(i))
                shutil.rmtree(merged / str(i))
            if row.source == "learned_cat":
                info["tune"] = tuned[row.skills].info
            row_started = time.perf_counter()
            slots.load(adapter)
            results = score(slots.model, tokenizer, row.tasks, args.size, args.batch_size, args.max_new_tokens)
            records.append({"merge": row.merge, "method": row.method, "source": row.source,
                            "skills": list(row.skills), "rank": adapter.max_rank if adapter else None,
                            **{k: v for k, v in info.items() if k != "rank"},
                            "score_seconds": time.perf_counter() - row_started, "results": results})
            if row.source == "mixed":
                records[-1]["training"] = mixed_info
            if args.out:  # after every row: a run cut short still leaves the rows it scored
                write_json(args.out, {"settings": settings(args), "hardware": hardware(args.device),
                                      "seconds": {**seconds, "total": time.perf_counter() - started},
                                      "complete": False, "rows": records})
            log(f"  {row.merge} | {row.method}: " + " ".join(
                f"{task} {r['accuracy']:.2f}" for task, r in results.items()) + f" ({records[-1]['score_seconds']:.1f} s)")
        seconds["scoring"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    return {"settings": settings(args), "hardware": hardware(args.device), "seconds": seconds, "complete": True,
            "rows": records}


def write_json(path: Path, saved: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(json.dumps(saved, indent=1) + "\n")
    staging.replace(path)


def settings(args) -> dict:
    return {"size": args.size, "greedy": True, "max_new_tokens": args.max_new_tokens, "dtype": str(args.dtype),
            "batch_size": args.batch_size, "ci": "95% Wilson", "base": args.base.name,
            "skills": str(args.skills), "methods": list(METHODS), "mixed_steps": args.mixed_steps,
            "mixed_batch_size": args.mixed_batch_size, "tune_steps": args.tune_steps,
            "tune_examples_per_skill": TUNE_PER_SKILL, "tune_seed": TUNE_SEED, "only": args.only,
            "merge_workers": args.merge_workers}


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}), torch {torch.__version__}"


# --- the markdown table ---------------------------------------------------------------------

def cell(result: dict | None) -> str:
    if result is None:
        return ""
    low, high = result["ci95"]
    return f"{result['accuracy']:.2f} [{low:.2f}, {high:.2f}]"


def _key(rec: dict) -> str:
    return f"{rec['merge']} | {rec['method']}"


def combine(saved_runs: dict[str, dict]) -> dict:
    """Runs of the same plan cut short (the device call's time limit), as one: each row once, in
    plan order, with the run it came from; each run's settings, hardware and seconds kept; the
    planned rows no run scored listed. A row scored twice must have the same counts in both runs
    (the base row is in every run)."""
    runs, rows = {}, {}
    for label, saved in saved_runs.items():
        if saved["settings"]["methods"] != list(METHODS):
            raise ValueError(f"run {label} planned the methods {saved['settings']['methods']}, not {list(METHODS)}")
        runs[label] = {k: saved[k] for k in ("settings", "hardware", "seconds", "complete")}
        for rec in saved["rows"]:
            key = _key(rec)
            if key not in rows:
                rows[key] = {**rec, "run": label}
                continue
            counts = {t: r["correct"] for t, r in rec["results"].items()}
            first = {t: r["correct"] for t, r in rows[key]["results"].items()}
            if counts != first:
                raise ValueError(f"{key}: run {label} scored {counts}, run {rows[key]['run']} {first}")
            rows[key]["run"] += f", {label}"
    rank = next(r["rank"] for r in rows.values() if r["source"] == "skill")
    planned = [f"{r.merge} | {r.method}" for r in plan(rank)]
    unknown = set(rows) - set(planned)
    if unknown:
        raise ValueError(f"rows not in the plan: {sorted(unknown)}")
    return {"runs": runs, "complete": False, "rows": [rows[k] for k in planned if k in rows],
            "not_run": [k for k in planned if k not in rows]}


def render(saved: dict) -> str:
    """The table of a saved run: one line per row, a column per task (accuracy [95% CI])."""
    if "runs" in saved:
        return render_combined(saved)
    s, secs = saved["settings"], saved["seconds"]
    title = (f"SmolLM2-135M-Instruct merge quality: n = {s['size']} per task, greedy, at most "
             f"{s['max_new_tokens']} new tokens, {s['dtype'].removeprefix('torch.')}; accuracy [95 % Wilson "
             f"interval]; {saved['hardware']}; {secs['total']:.0f} s in all (mixed LoRA "
             f"{secs.get('mixed_training', 0):.0f} s, learned CAT {secs.get('tuning', 0):.0f} s, scoring "
             f"{secs.get('scoring', 0):.0f} s). Weights 1/N unless stated; rank: the merged adapter's."
             + ("" if saved.get("complete", True) else " INCOMPLETE: the run stopped after these rows."))
    lines = [title, "", "| merge | method | rank | " + " | ".join(TASKS) + " |", "|---|---|---|" + "---|" * len(TASKS)]
    for rec in saved["rows"]:
        rank = "" if rec["rank"] is None else str(rec["rank"])
        cells = [cell(rec["results"].get(t)) for t in TASKS]
        lines.append(f"| {rec['merge']} | {rec['method']} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_combined(combined: dict) -> str:
    """The table of combined runs: a column for the run of each row, then the rows not run."""
    runs = combined["runs"]
    s = next(iter(runs.values()))["settings"]
    parts = []
    for label, run_ in runs.items():
        secs = run_["seconds"]
        parts.append(f"run {label}: {secs['total']:.0f} s" + "".join(
            f", {name} {secs[key]:.0f} s" for key, name in (("mixed_training", "mixed LoRA"), ("tuning", "learned CAT"))
            if key in secs) + ("" if run_["complete"] else " (cut short)")
            + (f", only rows matching {run_['settings']['only']}" if run_["settings"]["only"] else ""))
    hardware_ = sorted({r["hardware"] for r in runs.values()})
    title = (f"SmolLM2-135M-Instruct merge quality: n = {s['size']} per task, greedy, at most "
             f"{s['max_new_tokens']} new tokens, {s['dtype'].removeprefix('torch.')}; accuracy [95 % Wilson "
             f"interval]; {'; '.join(hardware_)}; {len(runs)} runs ({'; '.join(parts)}). "
             "Weights 1/N unless stated; rank: the merged adapter's.")
    lines = [title, "", "| merge | method | rank | " + " | ".join(TASKS) + " | run |",
             "|---|---|---|" + "---|" * (len(TASKS) + 1)]
    for rec in combined["rows"]:
        rank = "" if rec["rank"] is None else str(rec["rank"])
        cells = [cell(rec["results"].get(t)) for t in TASKS]
        lines.append(f"| {rec['merge']} | {rec['method']} | {rank} | " + " | ".join(cells) + f" | {rec['run']} |")
    if combined["not_run"]:
        lines += ["", f"Not run ({len(combined['not_run'])} planned rows): "
                  + "; ".join(f"`{k}`" for k in combined["not_run"]) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--render", type=Path, default=None, help="print the markdown table of a saved run")
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="combine saved runs (each labelled by its directory's name) into --out, print the table")
    parser.add_argument("--base", type=Path, default=None, help="default: the converted SmolLM2-135M-Instruct")
    parser.add_argument("--skills", type=Path, default=Path(__file__).parents[1] / "lab/real/assets/skills")
    parser.add_argument("--out", type=Path, default=None, help="write the run as JSON here")
    parser.add_argument("--size", type=int, default=200, help="examples per task")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="scoring dtype (default: bfloat16 on CUDA, else float32)")
    parser.add_argument("--batch-size", type=int, default=1024, help="prompts per generate call")
    parser.add_argument("--mixed-steps", type=int, default=300, help="steps of the mixed-data LoRA")
    parser.add_argument("--mixed-batch-size", type=int, default=32 * len(SKILLS),
                        help="its batch (default: the five skills' batches together, so it sees each skill's "
                        "data as often as that skill's own LoRA did)")
    parser.add_argument("--save-mixed", type=Path, default=None, help="also keep the mixed LoRA here")
    parser.add_argument("--tune-steps", type=int, default=200, help="learned CAT optimizer steps per merge")
    parser.add_argument("--merge-workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)),
                        help="processes merging on CPU while the GPU works")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--only", nargs="+", default=None,
                        help="only rows whose 'merge | method' has one of these texts (and the base)")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    if args.combine:
        combined = combine({p.parent.name: json.loads(p.read_text()) for p in args.combine})
        if args.out:
            write_json(args.out, combined)
        print(render(combined))
        return
    if args.base is None:
        from lab.real.base import ensure_base_model

        args.base = ensure_base_model()
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    saved = run(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(render(saved))
    if args.out:
        write_json(args.out, saved)


if __name__ == "__main__":
    main()
