"""bench/punica_gpu's serve plan: both servers up, the loads interleaved backend by backend,
the targets' loads first."""

import json

from bench import punica_gpu


def test_serve_loads_put_the_targets_first_and_cover_the_grid():
    loads = punica_gpu.serve_loads()
    assert [(case, c) for case, _, c in loads[:4]] == [
        ("base model", 16), ("8 adapters", 16), ("base model", 64), ("8 adapters", 64)]
    assert {(case, c) for case, _, c in loads} == {
        (case, c) for case in punica_gpu.CASES for c in punica_gpu.CONCURRENCY}
    assert dict((case, models) for case, models, _ in loads)["8 adapters"] == list("abcdefgh")


def test_serve_plan_alternates_the_target_pairs_then_runs_the_rest_once():
    plan = punica_gpu.serve_plan(repeats=3)
    head = [(case, c, r) for case, _, c, r in plan[:12]]
    assert head == [(case, c, r) for c in (16, 64) for r in range(3)
                    for case in ("base model", "8 adapters")]
    rest = [(case, c) for case, _, c, r in plan[12:]]
    assert rest == [(case, c) for case, c in punica_gpu.LOAD_ORDER
                    if c in punica_gpu.CONCURRENCY and (case, c) not in {(x, y) for x, y, _ in head}]
    assert all(r == 0 for *_, r in plan[12:])


def test_overheads_pair_each_run_with_the_base_model_run_beside_it():
    def run(kernels, case, repeat, tok_s):
        return dict(kernels=kernels, case=case, concurrency=16, repeat=repeat,
                    output_tokens_per_s=tok_s)

    # vLLM: the GPU slows down over the run; paired, the overhead is 20 % each time
    runs = [run("vllm", "base model", 0, 1000), run("vllm", "8 adapters", 0, 800),
            run("vllm", "base model", 1, 500), run("vllm", "8 adapters", 1, 400),
            run("vllm", "base model", 2, 750), run("vllm", "8 adapters", 2, 600),
            run("loramix", "base model", 0, 1000), run("loramix", "8 adapters", 0, 900),
            run("loramix", "base model", 1, 1000), run("loramix", "8 adapters", 1, 880),
            dict(kernels="loramix", case="8 adapters", concurrency=16, repeat=2, error="x")]
    (row,) = punica_gpu._overheads(runs)
    assert abs(row["vllm_overhead"] - 0.2) < 1e-12 and len(row["vllm_overheads"]) == 3
    assert abs(row["loramix_overhead"] - 0.11) < 1e-12  # median of 0.10 and 0.12
    assert abs(row["overhead_cut"] - (1 - 0.11 / 0.2)) < 1e-12
    rows = {(r["kernels"], r["case"]): r for r in punica_gpu.summarize_runs(runs)}
    assert rows[("vllm", "base model")]["output_tokens_per_s"] == 750
    assert rows[("vllm", "base model")]["repeats_tok_s"] == [500, 750, 1000]
    assert rows[("loramix", "8 adapters")]["repeats_tok_s"] == [880, 900]


def test_interleave_runs_each_load_on_both_backends_back_to_back_first_one_swapping():
    plan = punica_gpu.serve_plan(repeats=2)
    order = punica_gpu.interleave(plan)
    assert len(order) == 2 * len(plan)
    assert [(k, case, c, r) for k, case, _, c, r in order[:8]] == [
        ("vllm", "base model", 16, 0), ("loramix", "base model", 16, 0),
        ("vllm", "8 adapters", 16, 0), ("loramix", "8 adapters", 16, 0),
        ("loramix", "base model", 16, 1), ("vllm", "base model", 16, 1),
        ("loramix", "8 adapters", 16, 1), ("vllm", "8 adapters", 16, 1)]
    # the pairs: on each backend, the base model run and the adapters' run of one repeat
    # are as far apart as on the other (two loads in between, or none)
    for k in punica_gpu.BACKENDS:
        mine = [(case, c, r) for kk, case, _, c, r in order if kk == k]
        assert mine == [(case, c, r) for case, _, c, r in plan]


def test_cut_verdict_reads_the_target_off_a_bootstrap_interval():
    vllm = [0.20, 0.21, 0.19, 0.20, 0.22, 0.18]
    met = punica_gpu.cut_verdict([0.10, 0.11, 0.09, 0.10, 0.12, 0.08], vllm)
    assert met["target"] == "met" and met["overhead_cut_90"][0] >= 1 / 3
    assert met["overhead_cut_90"][0] <= 0.5 <= met["overhead_cut_90"][1]
    short = punica_gpu.cut_verdict([0.18, 0.19, 0.17, 0.18, 0.20, 0.16], vllm)
    assert short["target"] == "not met" and short["overhead_cut_90"][1] < 1 / 3
    noisy = punica_gpu.cut_verdict([0.27, -0.17, 0.05], [0.15, 0.30, 0.23])
    assert noisy["target"] == "undecided"
    assert punica_gpu.cut_verdict([0.1], vllm) == dict(overhead_cut_90=None, target="undecided")
    assert punica_gpu.cut_verdict([0.1, 0.1], [-0.1, 0.0])["target"] == "undecided"


def test_speed_verdict_reads_paired_samples():
    ours = [10.0, 10.2, 9.9, 10.1, 10.0, 10.3, 9.8, 10.0, 10.1]
    faster = punica_gpu.speed_verdict(ours, [2 * t for t in ours])
    assert faster["verdict"] == "faster" and faster["speedup"] == 2.0
    slower = punica_gpu.speed_verdict(ours, [0.9 * t for t in ours])
    assert slower["verdict"] == "slower" and slower["speedup_90"][1] < 1.0
    # drift that falls on both alike cancels in the per-pair ratios
    drift = [t * (1 + i) for i, t in enumerate(ours)]
    assert punica_gpu.speed_verdict(drift, [1.05 * t for t in drift])["verdict"] == "faster"
    tie = punica_gpu.speed_verdict(ours, [10.0, 10.0, 10.1, 9.9, 10.2, 10.0, 9.9, 10.0, 10.0])
    assert tie["verdict"] == "tie" and tie["speedup_90"][0] < 1.0 < tie["speedup_90"][1]


def test_slower_shapes_are_timed_again_and_the_second_timing_decides():
    rows = [dict(layer="l", tokens=1, pattern="1 adapter", rank=16, path="loramix",
                 speedup=0.97, verdict="slower", ours_us=1.0, vllm_us=0.97),
            dict(layer="l", tokens=64, pattern="1 adapter", rank=16, path="loramix",
                 speedup=0.96, verdict="slower", ours_us=1.0, vllm_us=0.96),
            dict(layer="l", tokens=1, pattern="8 adapters + base", rank=16, path="none",
                 speedup=0.9, verdict="slower"),
            dict(layer="l", tokens=4096, pattern="8 adapters", rank=16, path="loramix",
                 speedup=1.5, verdict="faster", wall_speedup=1.2, wall_verdict="faster")]
    again = {1: dict(speedup=1.01, verdict="tie", ours_us=1.0, vllm_us=1.01),
             64: dict(speedup=0.95, verdict="slower", ours_us=1.0, vllm_us=0.95)}
    timed = []

    def retime(row, reps):
        timed.append((row["tokens"], reps))
        return dict(rel_err=0.0, **again[row["tokens"]])

    assert punica_gpu.recheck_slower(rows, retime) == 2
    assert timed == [(1, punica_gpu.RECHECK_REPS), (64, punica_gpu.RECHECK_REPS)]
    assert rows[0]["verdict"] == "tie" and rows[0]["first"]["verdict"] == "slower"
    got = punica_gpu.never_slower(rows)
    assert got["never_slower"] == "not met" and [r["tokens"] for r in got["slower_shapes"]] == [64]
    assert got["no_work_shapes"] == 1 and got["verdict_counts"] == dict(faster=1, tie=1, slower=1)
    assert punica_gpu.never_slower([rows[0], rows[2], rows[3]])["never_slower"] == "met"


def test_agreement_overall_and_per_model():
    ours = [["1", "2"], ["3", "4"], ["5", "6"], ["7", "8"]]
    theirs = [["1", "2"], ["3", "9"], ["0", "6"], ["7", "8"]]
    got = punica_gpu.agreement(ours, theirs, ["base", "a"])
    assert got["requests"] == 4 and got["first_token"] == 0.75 and got["whole_sequence"] == 0.5
    assert got["base_model_whole_sequence"] == 0.5
    assert got["per_model"] == {"base": dict(first_token=1.0, whole_sequence=0.5),
                                "a": dict(first_token=0.5, whole_sequence=0.5)}


def test_kernel_parts_first_then_serve_takes_the_rest():
    both = punica_gpu.part_deadlines(0.0, 470.0, ["layers", "serve"], layers_share=0.3)
    assert both == {"layers": 470.0 * 0.3, "serve": 470.0}
    alone = punica_gpu.part_deadlines(0.0, 470.0, ["layers"], layers_share=0.3)
    assert alone["layers"] == 470.0


def test_tune_candidates_are_tables_the_launch_rules_read(tmp_path, monkeypatch):
    """Each candidate, bounded to a bucket, changes the launch only inside the bucket; a pair
    candidate runs the pair there though an earlier tune's rule made the bucket fused."""
    from bench import punica_tune
    from kernels import launch

    monkeypatch.setattr(launch, "CONFIG_DIR", tmp_path)
    earlier = {"min_tokens": 2, "max_tokens": 16, "min_rank": 17, "min_hidden_in": 8192}
    base = {"shrink": [{"block_m": 32, "block_k": 128}], "fused_when": [{"min_tokens": 65}, earlier]}
    bounds = dict(min_tokens=2, max_tokens=16, min_rank=17, max_rank=64, **punica_tune.REGION)
    seen = set()
    candidates = punica_tune.candidates(max_rank=64)
    assert len(candidates) > len(punica_tune.candidates(max_rank=16))  # rank blocks above 16
    for i, (name, rules) in enumerate(candidates):
        (tmp_path / f"c{i}.json").write_text(json.dumps(punica_tune.with_rules(base, rules, bounds)))
        punica_tune.clear_caches()
        inside = (launch.use_fused(f"c{i}", 16, 8, 64, 14336),
                  launch.shrink_launch(f"c{i}", 132, 16, 8, 14336, 64, 1))
        outside = [(launch.use_fused(f"c{i}", 16, 8, rank, k),
                    launch.shrink_launch(f"c{i}", 132, 16, 8, k, rank, 1))
                   for rank, k in ((64, 4096), (16, 14336))]  # narrow input; rank 16
        assert outside == [(False, launch.shrink_launch("c0", 132, 16, 8, k, rank, 1))
                           for rank, k in ((64, 4096), (16, 14336))]
        assert inside[0] == (not name.startswith("pair"))
        if name.startswith("pair"):
            assert inside[1].split_k == int(name.split("sk")[1].split()[0])
            assert inside[1].block_r == (int(name.split("br")[1]) if " br" in name else 0)
        seen.add(inside)
    assert len(seen) == len(candidates) - 6  # the table (fused here) and the 6 fused: one
    punica_tune.clear_caches()


def test_tune_keeps_the_table_unless_a_candidate_beats_it_by_the_margin():
    from bench.punica_tune import MARGIN, pick

    assert pick({"table": 1.05, "pair": 1.05 - MARGIN / 2}) == "table"
    assert pick({"table": 1.05, "pair": 0.98, "fused": 0.99}) == "pair"
    assert pick({"table": 0.9, "pair": float("inf")}) == "table"
