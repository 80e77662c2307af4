"""Write skill-lab training examples as JSONL ({"prompt", "completion"}), e.g. the small mix
of skills' training data that `loramix tune-cat` learns CAT weights on.

    python -m lab.data reverse upper --per-task 256 > mix.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

from lab.world import ALL_TASKS, train_stream

DEFAULT_SEED = 5  # a training stream no skill was trained on (skills used seed 1, the base 0)


def mix_name(tasks) -> str:
    """Directory name of the data-mixing baseline LoRA of `tasks` (lab/assets/baselines)."""
    return "mix-" + "-".join(tasks)


def mixed_examples(tasks: list[str], per_task: int, seed: int = DEFAULT_SEED) -> list[tuple[str, str]]:
    """`per_task` training examples of each task (never a dev or test prompt), task by task."""
    return [(ex.prompt, ex.answer) for task in tasks for ex in itertools.islice(train_stream(task, seed), per_task)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="+", choices=ALL_TASKS)
    parser.add_argument("--per-task", type=int, default=256)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args(argv)
    for prompt, completion in mixed_examples(args.tasks, args.per_task, args.seed):
        sys.stdout.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


if __name__ == "__main__":
    main()
