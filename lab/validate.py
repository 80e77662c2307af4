"""Print the skill lab's validity figures on CPU: exact match of the base, of each skill, and
of 1/N `cat` merges, on every task's held-out test set.

    .venv/bin/python -m lab.validate [--assets lab/assets] [--count 100]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from lab.compose import ASSETS, load_base, with_adapter, with_composition
from lab.evaluate import score
from lab.world import ALL_TASKS, TASKS, heldout_set


def validity(assets: Path, count: int, pairs: bool = True) -> dict[str, dict[str, float]]:
    """{model label: {task: exact match}} for base, each skill, cat(all), cat(pairs)."""
    model, tokenizer = load_base(assets / "base")
    skills_dir = assets / "skills"
    skills = sorted(p.name for p in skills_dir.iterdir())
    test = {t: heldout_set(t, count) for t in ALL_TASKS}
    rows = {"base": score(model, tokenizer, test)}
    for skill in skills:
        peft = with_adapter(model, skills_dir / skill)
        rows[skill] = score(peft, tokenizer, test)
        model = peft.unload()
    combos = [skills] + ([list(c) for c in itertools.combinations(skills, 2)] if pairs else [])
    for names in combos:
        peft = with_composition(model, skills_dir, names)
        rows["cat(" + "+".join(names) + ")"] = score(peft, tokenizer, test)
        model = peft.unload()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path, default=ASSETS)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--no-pairs", action="store_true")
    args = parser.parse_args(argv)
    rows = validity(args.assets, args.count, pairs=not args.no_pairs)
    print(f"{'model':<28}" + "".join(f"{t:>14}" for t in ALL_TASKS))
    for label, accs in rows.items():
        print(f"{label:<28}" + "".join(f"{accs[t]:>14.2f}" for t in ALL_TASKS))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
