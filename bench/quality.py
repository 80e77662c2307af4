"""Merge quality on the skill lab: exact match of merged skills on each skill's held-out test.

For the base, each skill alone (the upper bound), and every method (linear, cat with 1/N,
ties, svd, lego) on multi-task merges of two skills and of all skills, plus the composite task
reverse_upper ("reverse upper: abc =>" -> " CBA", never trained as a skill) for merges that
hold both reverse and upper. CPU, greedy decoding, prints a markdown table.

    python bench/quality.py --quick        # 40 test examples per task (a few minutes on CPU)
    python bench/quality.py                # 200 per task
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.compose import ASSETS, load_base, with_adapter, with_composition  # noqa: E402
from lab.evaluate import score  # noqa: E402
from lab.world import heldout_set  # noqa: E402

SKILLS = ("reverse", "upper", "sort", "add")
COMBOS = (("reverse", "upper"), ("sort", "add"), SKILLS)
METHODS = ("linear", "cat", "ties", "svd", "lego")
COMPOSITE = "reverse_upper"


def _tasks(names) -> list[str]:
    tasks = list(names)
    if "reverse" in names and "upper" in names:
        tasks.append(COMPOSITE)
    return tasks


def run(count: int) -> list[tuple[str, str, dict[str, float]]]:
    """Rows (merge, method, {task: exact match}) over the tasks each merge is judged on."""
    model, tokenizer = load_base(ASSETS / "base")
    skills_dir = ASSETS / "skills"
    all_tasks = [*SKILLS, COMPOSITE]
    test = {t: heldout_set(t, count) for t in all_tasks}
    rows = [("-", "base", score(model, tokenizer, test))]
    for skill in SKILLS:
        peft = with_adapter(model, skills_dir / skill)
        rows.append((skill, "skill alone", score(peft, tokenizer, {t: test[t] for t in all_tasks})))
        model = peft.unload()
    for names in COMBOS:
        tasks = _tasks(names)
        for method in METHODS:
            peft = with_composition(model, skills_dir, list(names), method=method)
            rows.append(("+".join(names), method, score(peft, tokenizer, {t: test[t] for t in tasks})))
            model = peft.unload()
    return rows


def table(rows, count: int) -> str:
    cols = [*SKILLS, COMPOSITE]
    lines = ["| merge | method | " + " | ".join(cols) + " | mean (merged skills) |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for merge_name, method, accs in rows:
        cells = [f"{accs[c]:.2f}" if c in accs else "" for c in cols]
        members = merge_name.split("+") if merge_name != "-" else list(SKILLS)
        if method == "skill alone":
            members = [merge_name]
        mean = sum(accs[m] for m in members) / len(members)
        lines.append(f"| {merge_name} | {method} | " + " | ".join(cells) + f" | {mean:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 examples per task instead of 200")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args(argv)
    count = args.count or (40 if args.quick else 200)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    rows = run(count)
    print(f"Skill lab merge quality: {count} held-out examples per task, exact match, greedy; "
          f"CPU ({platform.processor() or platform.machine()}, torch {torch.__version__}), "
          f"{time.time() - started:.0f} s. Weights 1/N; methods' default ranks and options.")
    print(table(rows, count))


if __name__ == "__main__":
    main()
