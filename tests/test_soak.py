"""A short soak (bench/soak.py) as a test: the real server under 32 concurrent mixed,
impatient and hostile clients for 20 s answers every request as it should (no timing asserts)."""

from __future__ import annotations

import pytest

from bench import soak


@pytest.mark.slow
def test_short_soak_has_no_errors(demo_paths, tmp_path):
    result = soak.main([
        "--clients", "32", "--duration", "20", "--max-tokens", "8", "--rss-every", "2",
        "--demo-dir", str(demo_paths.base_dir.parent), "--work-dir", str(tmp_path / "work"),
        "--out", str(tmp_path / "soak.json"),
    ])
    assert result["errors"] == 0, result["error_examples"]
    assert result["outcomes"].get("ok", 0) > 0
    assert result["requests_by_behaviour"].get("new_composition", 0) > 0
