"""`loramix merge` end to end: real adapter directories in, a PEFT directory out."""

from __future__ import annotations

from typer.testing import CliRunner

from lora_factories import MODULE_SHAPES, merged_delta, random_adapter, rel, weighted_delta
from merging import load_adapter
from server.cli import app


def test_merge_command_writes_a_loadable_adapter(tmp_path):
    adapters = [random_adapter(1, rank=4), random_adapter(2, rank=6)]
    for i, adapter in enumerate(adapters):
        adapter.save(tmp_path / f"skill{i}")
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        app,
        ["merge", "--method", "cat", "--weights", "0.7,0.3", "--quiet", "-o", str(out),
         str(tmp_path / "skill0"), str(tmp_path / "skill1")],
    )
    assert result.exit_code == 0, result.output
    assert "with cat → rank 10" in result.output and "exact" in result.output
    merged = load_adapter(out)
    for module in MODULE_SHAPES:
        assert rel(merged_delta(merged, module), weighted_delta(adapters, [0.7, 0.3], module)) < 1e-5


def test_merge_command_with_method_options_reports_the_error(tmp_path):
    for i in range(2):
        random_adapter(i, rank=4).save(tmp_path / f"s{i}")
    args = ["merge", "--method", "lego", "--rank", "3", "--option", "seed=5", "--option", "features=raw",
            "--quiet", "-o", str(tmp_path / "m"), str(tmp_path / "s0"), str(tmp_path / "s1")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "relative ΔW error" in result.output and load_adapter(tmp_path / "m").max_rank == 3


def test_merge_command_rejects_bad_input_without_writing(tmp_path):
    random_adapter(1).save(tmp_path / "s0")
    out = tmp_path / "m"
    bad_method = CliRunner().invoke(app, ["merge", "--method", "nope", "-o", str(out), str(tmp_path / "s0")])
    assert bad_method.exit_code == 2 and "unknown merge method" in bad_method.output
    bad_option = CliRunner().invoke(
        app, ["merge", "--method", "ties", "--option", "density=2", "-o", str(out), str(tmp_path / "s0")]
    )
    assert bad_option.exit_code == 2 and "density" in bad_option.output
    assert not out.exists()
