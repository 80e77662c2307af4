"""Merge-quality regression check: a quick variant of bench/quality.py on the shipped skill lab.

The same code as the benchmark (merges through `merging`, scoring through lab.evaluate) on the
first 40 held-out examples per task, for a handful of rows. Each merge's mean exact match over
its merged skills must stay above a floor set about 3 standard errors (at 40 examples per task)
below the value the full benchmark measured (200 per task), and above the base on the same
sample. CPU, greedy, deterministic: a failure means merging or the lab changed, not chance.
"""

from __future__ import annotations

import pytest

from bench.quality import SKILLS, Row, run

COUNT = 40  # held-out examples per task
ALL = "+".join(SKILLS)
# (merge, method) -> floor for the mean over the merged skills' own tasks: the full benchmark's
# mean minus 3 standard errors at this sample's size (40 x number of merged skills), rounded.
# Measured (bench/results/quality_cpu.json, 200 per task) / on this sample (40 per task):
#   base (4 skills)       0.63 / 0.64   (on reverse+upper alone: 0.83 / 0.88)
#   cat reverse+upper     0.98 / 0.97   3 SE = 0.05
#   cat all four          0.80 / 0.81   3 SE = 0.10
#   ties all four         0.72 / 0.74   3 SE = 0.11 (the floor is under the base: the
#                                       comparison with the base on the same sample covers it)
#   svd all four          0.79 / 0.79   3 SE = 0.10
FLOORS = {
    ("reverse+upper", "cat"): 0.93,
    (ALL, "cat"): 0.70,
    (ALL, "ties"): 0.61,
    (ALL, "svd"): 0.69,
}
ROWS = [Row("-", "base", "base")] + [
    Row(merge, method, "merge", tuple(merge.split("+")), method) for merge, method in FLOORS
]


@pytest.fixture(scope="module")
def records() -> dict[tuple[str, str], dict]:
    return {(r["merge"], r["method"]): r for r in run(ROWS, COUNT)}


def test_base_is_partly_competent(records):
    base = records[("-", "base")]
    assert 0.4 <= base["mean"] <= 0.8, base["scores"]


@pytest.mark.parametrize("key", list(FLOORS), ids=[" ".join(k) for k in FLOORS])
def test_merge_keeps_its_skills(records, key):
    merged, base = records[key], records[("-", "base")]
    assert merged["mean"] >= FLOORS[key], merged["scores"]
    base_mean = sum(base["scores"][t] for t in key[0].split("+")) / len(key[0].split("+"))
    assert merged["mean"] > base_mean, (merged["scores"], base["scores"])
