"""bench/punica_gpu's serve plan: one server at a time, each over its share of the budget,
the targets' loads first (the first H200 run lost its serve part to two servers at once)."""

from bench import punica_gpu


def test_serve_loads_put_the_targets_first_and_cover_the_grid():
    loads = punica_gpu.serve_loads()
    assert [(case, c) for case, _, c in loads[:4]] == [
        ("base model", 16), ("8 adapters", 16), ("base model", 64), ("8 adapters", 64)]
    assert {(case, c) for case, _, c in loads} == {
        (case, c) for case in punica_gpu.CASES for c in punica_gpu.CONCURRENCY}
    assert dict((case, models) for case, models, _ in loads)["8 adapters"] == list("abcdefgh")


def test_backends_split_the_time_left_evenly():
    first = punica_gpu.backend_deadline(100.0, 500.0, backends_left=2)
    assert first == 300.0
    assert punica_gpu.backend_deadline(260.0, 500.0, backends_left=1) == 500.0  # early finish
    assert punica_gpu.backend_deadline(600.0, 500.0, backends_left=1) == 600.0  # past it


def test_serve_takes_the_whole_budget_without_the_layers_part():
    both = punica_gpu.part_deadlines(0.0, 470.0, ["layers", "serve"], layers_share=0.3)
    assert both == {"serve": 470.0 * 0.7, "layers": 470.0}
    alone = punica_gpu.part_deadlines(0.0, 470.0, ["serve"], layers_share=0.3)
    assert alone["serve"] == 470.0
