"""Settings from flags and LORAMIX_* env vars, the CLI generated from them, engine choice,
and app creation being repeatable in one process (metrics registered once)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from server import cli
from server.app import create_app
from server.engines import create_engine, resolve_engine_name
from server.engines.local import LocalEngine
from server.settings import Settings


def test_env_vars_fill_settings(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIX_PORT", "9123")
    monkeypatch.setenv("LORAMIX_STRICT_RANK", "true")
    monkeypatch.setenv("LORAMIX_SKILLS_DIR", str(tmp_path))
    monkeypatch.setenv("LORAMIX_MAX_LORA_RANK", "32")
    settings = Settings()
    assert (settings.port, settings.strict_rank, settings.skills_dir, settings.max_lora_rank) == (9123, True, tmp_path, 32)


def test_bad_setting_values_are_rejected():
    with pytest.raises(ValueError):
        Settings(engine="tensorrt")
    with pytest.raises(ValueError):
        Settings(gpu_memory_utilization=1.5)


def test_every_setting_is_a_serve_flag():
    result = CliRunner().invoke(cli.app, ["serve", "--help"], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.output, name
    assert "--skills" in result.output


def test_serve_flags_win_over_env_and_bad_values_stop_serve_before_it_starts(monkeypatch):
    monkeypatch.setenv("LORAMIX_MAX_LORAS", "3")
    monkeypatch.setenv("LORAMIX_STRICT_RANK", "true")
    settings = Settings(_cli_parse_args=["--max-loras", "5", "--skills", "/s", "--enforce-eager", "--no-strict-rank",
                                         "--tensor-parallel-size=2"])
    assert (settings.max_loras, str(settings.skills_dir), settings.enforce_eager, settings.strict_rank) == (5, "/s", True, False)
    assert settings.vllm.tensor_parallel_size == 2 and settings.local.max_loras == 5
    result = CliRunner().invoke(cli.app, ["serve", "--engine", "vllm", "--max-lora-rank", "12"])
    assert result.exit_code == 2 and "max_lora_rank must be one of 1, 8, 16" in result.output
    result = CliRunner().invoke(cli.app, ["serve", "--max-loras", "0"])
    assert result.exit_code == 2 and "--max-loras: Input should be greater than or equal to 1" in result.output
    # vLLM's ranks bind the vLLM engine only
    assert Settings(engine="local", max_lora_rank=12).local.max_lora_rank == 12


def test_auto_engine_prefers_vllm_when_importable(monkeypatch):
    import server.engines as engines

    monkeypatch.setattr(engines, "_vllm_importable", lambda: False)
    assert resolve_engine_name("auto") == "local"
    monkeypatch.setattr(engines, "_vllm_importable", lambda: True)
    assert resolve_engine_name("auto") == "vllm"
    assert resolve_engine_name("local") == "local"


def test_local_engine_gets_the_settings(tiny_base):
    engine = create_engine(Settings(engine="local", max_loras=3, max_lora_rank=32, max_batch_size=5), tiny_base)
    assert isinstance(engine, LocalEngine)
    assert engine.max_lora_rank == 32 and engine.max_loras == 3 and engine.max_batch_size == 5
    engine = create_engine(Settings(engine="local", kv_cache="static", max_model_len=64,
                                    enforce_eager=True), tiny_base)
    assert (engine.kv_cache, engine._max_model_len_option, engine.enforce_eager) == ("static", 64, True)
    with pytest.raises(ValidationError):
        Settings(kv_cache="paged")


def test_app_can_be_created_twice_in_one_process(tiny_base, skills_dir, tmp_path):
    settings = Settings(base_model=tiny_base, skills_dir=skills_dir, cache_dir=tmp_path)
    first, second = create_app(settings), create_app(settings)
    paths = {route.path for route in second.routes}
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/compositions", "/health", "/metrics"} <= paths
    assert first is not second


def test_merge_command_writes_the_merged_adapter(skills_dir, tmp_path):
    import merging

    out = tmp_path / "merged"
    args = ["merge", str(skills_dir / "math"), str(skills_dir / "code"), "-o", str(out),
            "--method", "svd", "--rank", "4", "--weights", "0.7,0.3", "--quiet"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    assert "svd" in result.output and "rank 4" in result.output
    merged = merging.load_adapter(out)
    expected = merging.merge(
        [merging.load_adapter(skills_dir / "math"), merging.load_adapter(skills_dir / "code")],
        [0.7, 0.3], method="svd", rank=4,
    ).adapter
    assert merged.max_rank == 4
    for name, module in expected.modules.items():
        assert (merged.modules[name].delta() - module.delta()).abs().max() < 1e-5


def test_merge_command_reports_bad_options_without_a_traceback(skills_dir, tmp_path):
    args = ["merge", str(skills_dir / "math"), "-o", str(tmp_path / "x"), "--method", "lego",
            "--option", "bogus=1", "--quiet"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2
    assert "unknown option 'bogus'" in result.output
    assert not (tmp_path / "x").exists()
