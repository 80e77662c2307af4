"""The skill lab's world: small text tasks with exact answers, deterministic splits.

Every example is a prompt "<task>: <input> =>" and an answer " <output>" (leading space). The
model sees "<|bos|>" + prompt + answer + "<|eos|>". Test and dev inputs are drawn first from a
fixed seed; training inputs are drawn on the fly and never repeat a dev or test input.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass

LETTERS = string.ascii_lowercase


@dataclass(frozen=True)
class Example:
    """One task instance: the prompt the model is given and the exact answer expected."""

    task: str
    prompt: str
    answer: str  # with its leading space, as the model produces it

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def _word(rng: random.Random, lo: int = 3, hi: int = 8) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _reverse(rng):
    word = _word(rng)
    return word, word[::-1]


def _upper(rng):
    word = _word(rng)
    return word, word.upper()


def _sort(rng):
    word = _word(rng)
    return word, "".join(sorted(word))


def _add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}", str(a + b)


def _lookup(rng):
    keys = rng.sample(LETTERS, rng.randint(3, 5))
    values = [str(rng.randint(0, 9)) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = ",".join(f"{k}={v}" for k, v in zip(keys, values))
    return f"{pairs} ? {keys[query]}", values[query]


def _reverse_upper(rng):
    word = _word(rng)
    return word, word[::-1].upper()


# Skill tasks (each gets a LoRA) and composite tasks (need two skills at once, no LoRA).
TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "reverse": _reverse,
    "upper": _upper,
    "sort": _sort,
    "add": _add,
    "lookup": _lookup,
}
COMPOSITES: dict[str, tuple[Callable[[random.Random], tuple[str, str]], str]] = {
    # name: (generator, prompt tag)
    "reverse_upper": (_reverse_upper, "reverse upper"),
}
ALL_TASKS = (*TASKS, *COMPOSITES)
ALPHABET = LETTERS + LETTERS.upper() + string.digits + " :=>+,?"
SEED = 1234
SPLIT_SIZE = 200  # dev and test examples per task


def _generator(task: str):
    if task in TASKS:
        return TASKS[task], task
    if task in COMPOSITES:
        return COMPOSITES[task]
    raise KeyError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def make_example(task: str, rng: random.Random) -> Example:
    """Draw one example of `task` from `rng`."""
    gen, tag = _generator(task)
    source, target = gen(rng)
    return Example(task, f"{tag}: {source} =>", f" {target}")


def _task_seed(task: str, salt: int) -> int:
    # A stable per-task seed (str hash is randomised per process).
    return SEED * 1000 + salt * 100 + ALL_TASKS.index(task)


def _distinct(task: str, salt: int, count: int, exclude: set[str]) -> list[Example]:
    rng = random.Random(_task_seed(task, salt))
    out, seen = [], set(exclude)
    while len(out) < count:
        ex = make_example(task, rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
    return out


def heldout_set(task: str, count: int = SPLIT_SIZE) -> list[Example]:
    """The held-out test examples of `task` (fixed seed, distinct prompts)."""
    return _distinct(task, 1, SPLIT_SIZE, set())[:count]


def dev_set(task: str, count: int = SPLIT_SIZE) -> list[Example]:
    """Validation examples of `task` for early stopping; disjoint from the test set."""
    held = {ex.prompt for ex in heldout_set(task)}
    return _distinct(task, 2, SPLIT_SIZE, held)[:count]


def train_stream(task: str, seed: int) -> Iterator[Example]:
    """Endless training examples of `task`, never a dev or test prompt."""
    held = {ex.prompt for ex in heldout_set(task)} | {ex.prompt for ex in dev_set(task)}
    rng = random.Random(_task_seed(task, 3) + 7919 * seed)
    while True:
        ex = make_example(task, rng)
        if ex.prompt not in held:
            yield ex


def exact_match(predictions: list[str], examples: list[Example]) -> float:
    """Fraction of predictions equal to the answer (surrounding whitespace ignored)."""
    if not examples:
        return 0.0
    hits = sum(p.strip() == ex.answer.strip() for p, ex in zip(predictions, examples))
    return hits / len(examples)
