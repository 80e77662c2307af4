"""The real-model merge-quality runner (bench/real_quality.py) and its one-call GPU script
(lab/real/gpu_train.sh quality), run whole on CPU in a tiny setting: the tiny random Llama,
five tiny skills trained for one step, n = 4, short replies. It checks the plan (every registry
method of every merge), the files the GPU run hands back, and that every cell is a count with
its Wilson interval; the accuracies themselves are the real model's business."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.real_quality import combine, lego_ranks, merges, plan, render, selected
from lab.real.data import COMPOSITES, MIXED, SKILLS, TASKS
from lab.real.evaluate import wilson_interval
from merging import METHODS, load_adapter

REPO = Path(__file__).resolve().parent.parent
SIZE = 4
# Rows of the CPU run (a full plan is about 100 rows): a skill, the mixed LoRA, one pair with
# every method, and the five-skill merge's widest LEGO and its learned CAT.
ONLY = ("words | skill", MIXED, "capital+upper", f"{'+'.join(SKILLS)} | lego k=80", f"{'+'.join(SKILLS)} | cat (learned)")


def test_plan_has_every_registry_method_for_every_merge():
    rows = plan(16)
    assert [(r.merge, r.source) for r in rows[:7]] == [
        ("-", "base"), *((s, "skill") for s in SKILLS), (MIXED, "mixed")]
    for skills, tasks in merges():
        mine = [r for r in rows if r.skills == skills and r.source in ("merge", "learned_cat")]
        assert {r.merge_method for r in mine if r.source == "merge"} >= set(METHODS)
        assert {r.method for r in mine} >= {"cat (1/N)", "cat (weight 1)", "cat (learned)"}
        assert all(r.tasks == tasks for r in mine)
    assert [tasks for _, tasks in merges()][-1] == TASKS
    assert {tasks[-1] for _, tasks in merges()[:-1]} == set(COMPOSITES)
    labels = [(r.merge, r.method) for r in rows]
    assert len(labels) == len(set(labels))


def test_lego_ranks_half_twice_and_all_units():
    assert lego_ranks(16, 2) == [(8, ""), (32, " (all)")]
    assert lego_ranks(16, 5) == [(8, ""), (32, ""), (80, " (all)")]


@pytest.fixture(scope="module")
def tiny_skills(tiny_base, tmp_path_factory) -> Path:
    """The five real-lab skills trained one step each on the tiny model (non-zero lora_B)."""
    from lab.real.train import TrainConfig, train_and_save

    out = tmp_path_factory.mktemp("real-skills")
    config = TrainConfig(steps=1, batch_size=2, warmup_steps=1, eval_size=0, log_every=1)
    for skill in SKILLS:
        train_and_save(tiny_base, out, skill, config, "cpu", log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def gpu_run(tiny_base, tiny_skills, tmp_path_factory) -> Path:
    """$OUT of `gpu_train.sh quality` run on CPU with the tiny model and skills."""
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "OUT": str(out), "N": str(SIZE), "PYTHON": sys.executable}
    command = ["bash", "lab/real/gpu_train.sh", "quality", "--skills", str(tiny_skills), "--base", str(tiny_base),
               "--device", "cpu", "--", "--mixed-steps", "2", "--mixed-batch-size", "5", "--tune-steps", "2",
               "--merge-workers", "2", "--max-new-tokens", "6", "--only", *ONLY]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_gpu_script_hands_back_few_small_files(gpu_run):
    files = sorted(p.relative_to(gpu_run).as_posix() for p in gpu_run.rglob("*") if p.is_file())
    assert files == ["mixed.tar", "quality.json", "quality.log", "quality.md"]
    assert all((gpu_run / f).stat().st_size < 16 * 2**20 for f in files)


def test_every_cell_is_a_count_with_its_wilson_interval(gpu_run):
    saved = json.loads((gpu_run / "quality.json").read_text())
    rows = saved["rows"]
    assert [(r["merge"], r["method"]) for r in rows] == [
        (r.merge, r.method) for r in plan(16) if r.source == "base" or selected(r, ONLY)]
    for rec in rows:
        expected_tasks = TASKS if rec["source"] in ("base", "skill", "mixed") or len(rec["skills"]) == len(SKILLS) \
            else (*rec["skills"], next(t for t in COMPOSITES if t.split("_") == list(rec["skills"])))
        assert tuple(rec["results"]) == tuple(expected_tasks), rec["method"]
        for result in rec["results"].values():
            assert result["n"] == SIZE and 0 <= result["correct"] <= SIZE
            assert result["accuracy"] == result["correct"] / SIZE
            assert result["ci95"] == pytest.approx(wilson_interval(result["correct"], SIZE), abs=1e-4)
            assert len(result["samples"]) == 3 and all(s["prompt"] for s in result["samples"])
    assert {r["source"] for r in rows} == {"base", "skill", "mixed", "merge", "learned_cat"}
    assert saved["settings"]["methods"] == list(METHODS) and saved["seconds"]["total"] > 0


def test_merge_rows_record_the_merge_they_scored(gpu_run):
    rows = {(r["merge"], r["method"]): r for r in json.loads((gpu_run / "quality.json").read_text())["rows"]}
    pair = "capital+upper"
    assert rows[(pair, "cat (1/N)")]["weights"] == [0.5, 0.5] and rows[(pair, "cat (1/N)")]["rank"] == 32
    assert rows[(pair, "cat (weight 1)")]["weights"] == [1.0, 1.0]
    assert rows[(pair, "cat (1/N)")]["relative_error"] == 0.0
    assert rows[(pair, "svd")]["rank"] == 16 and rows[(pair, "svd")]["relative_error"] > 0
    assert rows[(pair, "lego k=8")]["rank"] == 8
    learned = rows[(pair, "cat (learned)")]
    assert learned["tune"]["chat"] is True and learned["tune"]["steps"] == 2
    assert rows[(MIXED, f"LoRA on mixed data ({len(SKILLS)} skills)")]["training"]["batch_size"] == 5


def test_mixed_lora_is_handed_back_as_a_bf16_peft_adapter(gpu_run, tmp_path):
    import torch

    with tarfile.open(gpu_run / "mixed.tar") as tar:
        tar.extractall(tmp_path, filter="data")
    adapter = load_adapter(tmp_path / MIXED)
    assert adapter.dtype == torch.bfloat16 and adapter.max_rank == 16
    assert json.loads((tmp_path / MIXED / "train_report.json").read_text())["skill"] == MIXED


def test_render_gives_one_line_per_row(gpu_run):
    saved = json.loads((gpu_run / "quality.json").read_text())
    table = render(saved).splitlines()
    assert table[2].startswith("| merge | method | rank | arithmetic |")
    assert len(table) == 4 + len(saved["rows"])
    assert (gpu_run / "quality.md").read_text().strip() == render(saved)


def _saved(rows, correct: int, only=None) -> dict:
    """A saved run of `rows` (plan rows) where every cell has `correct` of 200."""
    cell = {"correct": correct, "n": 200, "accuracy": correct / 200, "ci95": list(wilson_interval(correct, 200))}
    records = [{"merge": r.merge, "method": r.method, "source": r.source, "skills": list(r.skills),
                "rank": None if r.source == "base" else 16, "results": {t: cell for t in r.tasks}} for r in rows]
    settings = {"size": 200, "max_new_tokens": 48, "dtype": "torch.bfloat16", "methods": list(METHODS), "only": only}
    return {"settings": settings, "hardware": "H", "seconds": {"total": 1.0}, "complete": False, "rows": records}


def test_combine_keeps_plan_order_marks_runs_and_lists_rows_not_run():
    rows = plan(16)
    first, second = _saved(rows[:10], 5), _saved([rows[0], rows[-1], rows[12]], 5, only=["x"])
    combined = combine({"q1": first, "q2": second})
    assert [(r["merge"], r["method"]) for r in combined["rows"]] == [
        (r.merge, r.method) for r in (*rows[:10], rows[12], rows[-1])]
    assert [r["run"] for r in combined["rows"]] == ["q1, q2"] + ["q1"] * 9 + ["q2", "q2"]
    assert combined["not_run"] == [f"{r.merge} | {r.method}" for r in (rows[10:12] + rows[13:-1])]
    table = render(combined)
    assert table.count("| - | base |") == 1 and f"Not run ({len(rows) - 12} planned rows)" in table
    with pytest.raises(ValueError, match="base"):
        combine({"q1": first, "q2": _saved([rows[0]], 6)})  # the base row scored differently
