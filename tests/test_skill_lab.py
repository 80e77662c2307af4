"""The shipped skill lab (lab/assets): each skill masters its task where the base model only
half-does it, and a 1/N `cat` composition of two skills keeps both above the base.

Exact match on a fixed sample of each task's held-out test set, greedy decoding on CPU.
Thresholds come from measurements (below and docs/skill_lab.md), with margin.
"""

from __future__ import annotations

import pytest

from lab.compose import ASSETS, load_base, with_adapter, with_composition
from lab.demo import LAB_SKILLS
from lab.evaluate import score
from lab.world import heldout_set

SAMPLE = 24  # held-out examples per task
# Measured on this sample (CPU): base reverse 0.83, upper 0.88, sort 0.33, add 0.33; each skill
# 1.00 on its task; cat(sort+add) with 1/2 each: sort 0.83, add 0.88.
SKILL_MIN = 0.85  # each skill on its own task
SKILL_MARGIN = 0.08  # over the base on the same task (upper: the base already gets 0.88)
COMPOSE_MARGIN = 0.3  # a two-skill composition over the base on each of its tasks
# Base accuracy on each task must stay partial (the world is only useful if it does).
BASE_RANGE = (0.1, 0.95)


@pytest.fixture(scope="module")
def base():
    return load_base(ASSETS / "base")


@pytest.fixture(scope="module")
def base_scores(base):
    model, tokenizer = base
    return score(model, tokenizer, {t: heldout_set(t, SAMPLE) for t in LAB_SKILLS})


def test_base_is_partly_competent_on_every_task(base_scores):
    for task, acc in base_scores.items():
        assert BASE_RANGE[0] <= acc <= BASE_RANGE[1], (task, acc)


@pytest.mark.parametrize("skill", LAB_SKILLS)
def test_each_skill_masters_its_task(base, base_scores, skill):
    model, tokenizer = base
    peft = with_adapter(model, ASSETS / "skills" / skill)
    try:
        acc = score(peft, tokenizer, {skill: heldout_set(skill, SAMPLE)})[skill]
    finally:
        peft.unload()
    assert acc >= SKILL_MIN, acc
    assert acc >= base_scores[skill] + SKILL_MARGIN, (acc, base_scores[skill])


@pytest.mark.parametrize("names", [("sort", "add")])
def test_two_skill_cat_keeps_both_above_base(base, base_scores, names):
    model, tokenizer = base
    peft = with_composition(model, ASSETS / "skills", list(names))  # cat, weights 1/2 each
    try:
        accs = score(peft, tokenizer, {t: heldout_set(t, SAMPLE) for t in names})
    finally:
        peft.unload()
    for task in names:
        assert accs[task] >= base_scores[task] + COMPOSE_MARGIN, (task, accs[task], base_scores[task])
