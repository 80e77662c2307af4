"""Benchmark of loramix's multi-LoRA kernels against torch baselines and the bytes floor.

Run on a CUDA GPU (one H200 here):
    PYTHONUNBUFFERED=1 python3 bench/kernels.py --out $OUT/kernels.json
Steps: (1) GPU correctness of the full grid against the torch reference (bf16, plus fp16/fp32
spot checks), (2) optional config sweep (--sweep), (3) timings by CUDA-graph replay (median):
ours fused / unfused / auto, torch gather-bmm, torch per-adapter loop, the base linear layer,
and the bytes floor over a measured device-to-device copy bandwidth. Prints a table and writes
JSON; `--render JSON --results bench/RESULTS.md` turns a JSON into the "## Kernels" section.
`--dry-run` runs a tiny grid on CPU (TRITON_INTERPRET=1) to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
RANKS = [16, 64]
TOKENS = [1, 16, 64, 256, 1024, 4096]
ADAPTERS = [1, 8, 32]
DECODE_MAX_TOKENS = 64
# vLLM 0.33 Triton lora_shrink + lora_expand on an H200, from shared/ANCHORS.md (bf16, graph
# replay, median, µs): an anchor, NOT measured by this script (no vLLM on the GPU machine).
VLLM_ANCHOR = {(4096, 4096, 16, 1, 1): 7.7, (4096, 4096, 16, 16, 8): 9.2,
               (4096, 4096, 16, 64, 32): 21.9, (4096, 4096, 16, 1024, 8): 21.1,
               (4096, 4096, 16, 4096, 32): 118.9, (4096, 4096, 64, 64, 32): 45.4,
               (4096, 4096, 64, 4096, 32): 163.6, (4096, 14336, 16, 4096, 32): 310.3,
               (4096, 14336, 64, 64, 32): 71.0, (14336, 4096, 16, 16, 8): 9.4,
               (14336, 4096, 64, 4096, 32): 248.6}


def cases(shapes, ranks, tokens, adapters):
    """(K, N, rank, tokens, adapters), skipping more adapters than tokens."""
    return [(k, n, r, t, a) for (k, n) in shapes for r in ranks for t in tokens for a in adapters
            if a <= t]


def make_inputs(k, n, rank, tokens, adapters, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    x = rnd(tokens, k).to(dtype)
    lora_a = (rnd(adapters, rank, k) / k ** 0.5).to(dtype)
    lora_b = (rnd(adapters, n, rank) / rank ** 0.5).to(dtype)
    y = rnd(tokens, n).to(dtype)
    slot_ids = (torch.arange(tokens, device=device) % adapters).to(torch.int32)
    return y, x, lora_a, lora_b, slot_ids


# ---------------------------------------------------------------- baselines (torch)
def gather_bmm(y, x, lora_a, lora_b, slot_ids, scaling):
    """What vLLM's torch path does: gather each token's A and B, then batched products."""
    # y: [T, N], x: [T, K], lora_a: [S, R, K], lora_b: [S, N, R]
    ids = slot_ids.long()
    buf = torch.einsum("tk,trk->tr", x, lora_a[ids]) * scaling
    y += torch.einsum("tr,tnr->tn", buf, lora_b[ids])
    return y


def per_adapter_loop(groups):
    """One gather + two matmuls + index_add per active adapter (rows grouped ahead of time)."""
    def run(y, x, lora_a, lora_b, slot_ids, scaling):
        for slot, rows in groups:
            delta = (x.index_select(0, rows) @ lora_a[slot].T * scaling) @ lora_b[slot].T
            y.index_add_(0, rows, delta)
        return y
    return run


# ---------------------------------------------------------------- timing
def graph_time_us(fn, inner: int, replays: int = 15) -> float:
    """Median time of one fn() call: `inner` calls captured in a CUDA graph, timed by replay."""
    fn()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / inner)
    del graph
    return statistics.median(times)


def eager_time_us(fn, reps: int = 3) -> float:
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e6


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_us(fn, device) -> float:
    if device != "cuda":
        return eager_time_us(fn, reps=1)
    est = eager_time_us(fn)
    inner = int(max(1, min(50, 3000 / max(est, 1.0))))
    return graph_time_us(fn, inner)


def copy_bandwidth(device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    if device != "cuda":
        return float("nan")
    src = torch.randn(1 << 29, device=device)  # 2 GiB of float32
    dst = torch.empty_like(src)
    us = graph_time_us(lambda: dst.copy_(src), inner=5, replays=10)
    del src, dst
    return 2 * 4 * (1 << 29) / (us * 1e-6)


def launch_us(device) -> float:
    """Graph-replay cost of one minimal kernel (a 1-element add): the 'plus one launch'."""
    if device != "cuda":
        return float("nan")
    tiny = torch.zeros(1, device=device)
    return graph_time_us(lambda: tiny.add_(1.0), inner=50)


def floor_bytes(k, n, rank, tokens, adapters, elem=2):
    active = min(tokens, adapters)
    return elem * (tokens * k + active * rank * (k + n) + 2 * tokens * n)


# ---------------------------------------------------------------- correctness
def check_case(k, n, rank, tokens, adapters, dtype, device, fused, seed):
    from kernels import build_meta, reference, triton_ops
    y, x, a, b, ids = make_inputs(k, n, rank, tokens, adapters, dtype, device, seed)
    ids = torch.where(torch.arange(tokens, device=device) % 7 == 3, -1, ids)  # some idle rows
    y[ids < 0] = float("nan")
    scaling = torch.rand(adapters, device=device) + 0.5
    meta = build_meta(ids, adapters)
    expected = reference.add_lora(y.clone(), x, a, b, ids, scaling)
    out = triton_ops.add_lora(y.clone(), x, a, b, ids, scaling, meta=meta, fused=fused)
    idle = ids < 0
    same_idle = torch.equal(out[idle].view(torch.int16 if dtype != torch.float32 else torch.int32),
                            y[idle].view(torch.int16 if dtype != torch.float32 else torch.int32))
    act = ~idle
    finite = bool(torch.isfinite(out[act]).all())
    ref = expected[act].double()
    err = float((out[act].double() - ref).norm() / ref.norm().clamp_min(1e-12))
    tol = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return same_idle and finite and err < tol, err


def correctness(grid, device, dtypes_extra):
    failures, worst, count = [], 0.0, 0
    t0 = time.perf_counter()
    for i, (k, n, r, t, a) in enumerate(grid):
        for fused in ([True, False] if t <= 256 else [False]):
            ok, err = check_case(k, n, r, t, a, torch.bfloat16, device, fused, seed=i)
            count += 1
            worst = max(worst, err)
            if not ok:
                failures.append(dict(case=(k, n, r, t, a), fused=fused, err=err))
    for dtype in dtypes_extra:
        for i, (k, n, r, t, a) in enumerate([(96, 160, 8, 37, 5), (4096, 1024, 16, 64, 8),
                                             (160, 4096, 64, 300, 3)]):
            for fused in (True, False):
                ok, err = check_case(k, n, r, t, a, dtype, device, fused, seed=1000 + i)
                count += 1
                if not ok:
                    failures.append(dict(case=(k, n, r, t, a), dtype=str(dtype), err=err))
    print(f"correctness: {count} checks, {len(failures)} failures, worst bf16 rel err "
          f"{worst:.2e}, {time.perf_counter() - t0:.0f}s", flush=True)
    for f in failures[:20]:
        print("  FAIL", f, flush=True)
    return dict(checks=count, failures=failures, worst_bf16_rel_err=worst)


def graph_check(device) -> list[dict]:
    """Replaying a captured add_lora 3 times equals 3 reference applications (fused barrier
    counters must reset themselves; meta must need no host sync)."""
    from kernels import build_meta, reference, triton_ops
    out = []
    for k, n, r, t, a in [(4096, 4096, 16, 16, 8), (4096, 1024, 64, 64, 32),
                          (14336, 4096, 16, 256, 8)]:
        for fused in (True, False):
            y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device, seed=7)
            meta = build_meta(ids, a)
            expected = y.clone()
            for _ in range(3):
                reference.add_lora(expected, x, la, lb, ids, 0.5)
            work = y.clone()
            run = lambda: triton_ops.add_lora(work, x, la, lb, ids, 0.5, meta=meta,  # noqa: E731
                                              fused=fused)
            run()  # compile outside the capture
            work.copy_(y)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            work.copy_(y)
            for _ in range(3):
                graph.replay()
            torch.cuda.synchronize()
            err = float((work.double() - expected.double()).norm() / expected.double().norm())
            ok = bool(torch.isfinite(work).all()) and err < 1e-2
            out.append(dict(case=(k, n, r, t, a), fused=fused, err=err, ok=ok))
            print(f"graph replay x3 {k}->{n} r{r} t{t} a{a} fused={fused}: rel err {err:.1e} "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    return out


# ---------------------------------------------------------------- sweep
# Candidate overrides of the built-in launch configs (dataclasses.replace on launch.Launch)
SWEEP = {
    "fused": [{}, {"block_n": 64}, {"block_n": 256}, {"block_k": 64},
              {"block_k": 256, "num_stages": 3}, {"num_warps": 8}, {"split_k": 8},
              {"split_k": 16}, {"split_k": 32},
              {"block_n": 64, "block_k": 64, "num_stages": 3}, {"num_stages": 3}],
    "shrink": [{}, {"block_k": 64}, {"block_k": 256}, {"num_stages": 2}, {"num_warps": 8},
               {"split_k": 2}, {"split_k": 4}, {"split_k": 16}, {"block_m": 16}, {"block_m": 64},
               {"block_m": 64, "block_k": 64}],
    "expand": [{}, {"block_n": 64}, {"block_n": 256}, {"num_warps": 8}, {"num_stages": 3},
               {"block_m": 32}, {"block_m": 64}, {"block_n": 256, "num_warps": 8}],
}
SWEEP_CASES = [(4096, 4096, 16, 16, 8), (4096, 4096, 16, 64, 32), (14336, 4096, 16, 16, 8),
               (4096, 1024, 16, 16, 8), (4096, 14336, 64, 16, 8), (4096, 4096, 16, 256, 8),
               (4096, 14336, 64, 1024, 1), (4096, 1024, 64, 256, 1),
               (4096, 14336, 16, 64, 32), (4096, 4096, 64, 64, 32), (4096, 1024, 16, 1, 1),
               (4096, 4096, 16, 1024, 8), (4096, 4096, 64, 4096, 32),
               (14336, 4096, 64, 4096, 32), (4096, 14336, 16, 4096, 32)]


def sweep(device):
    """Time candidate launch configs per op on representative shapes (no autotuning at serve)."""
    from kernels import build_meta, launch, triton_ops
    out = []
    originals = dict(fused=launch.fused_launch, shrink=launch.shrink_launch,
                     expand=launch.expand_launch)
    try:
        for k, n, r, t, a in SWEEP_CASES:
            y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device)
            meta = build_meta(ids, a)
            base = dict(fused=originals["fused"]("x", 132, t, a, k, n, r, 1),
                        shrink=originals["shrink"]("x", 132, t, a, k, r, 1),
                        expand=originals["expand"]("x", t, n, r))
            for op, cands in SWEEP.items():
                if op == "fused" and t > 256:
                    continue
                for cand in cands:
                    cfg = dataclasses.replace(base[op], **cand)
                    for name, fn in originals.items():
                        setattr(launch, name + "_launch", fn)
                    setattr(launch, op + "_launch", lambda *_, c=cfg: c)
                    fused = op == "fused"
                    us = time_us(lambda: triton_ops.add_lora(y, x, la, lb, ids, 0.5, meta=meta,
                                                             fused=fused), device)
                    out.append(dict(case=(k, n, r, t, a), op=op, cfg=cand, us=us))
                    print(f"sweep {k}->{n} r{r} t{t} a{a} {op} {cand} {us:.1f}us", flush=True)
    finally:
        for name, fn in originals.items():
            setattr(launch, name + "_launch", fn)
    return out


# ---------------------------------------------------------------- timings
def bench_case(k, n, r, t, a, device, bandwidth):
    from kernels import build_meta, launch, triton_ops
    y, x, la, lb, ids = make_inputs(k, n, r, t, a, torch.bfloat16, device)
    meta = build_meta(ids, a)
    groups = [(s, torch.nonzero(ids == s).flatten()) for s in range(min(a, t))]
    row = dict(k=k, n=n, rank=r, tokens=t, adapters=a)
    row["floor_us"] = floor_bytes(k, n, r, t, a) / bandwidth * 1e6
    gpu, _ = launch.device_key(x.device)
    runs = {
        "unfused": lambda: triton_ops.add_lora(y, x, la, lb, ids, 0.5, meta=meta, fused=False),
        "gather_bmm": lambda: gather_bmm(y, x, la, lb, ids, 0.5),
        "loop": lambda: per_adapter_loop(groups)(y, x, la, lb, ids, 0.5),
    }
    weight = torch.randn(n, k, device=device).to(x.dtype)
    runs["base_linear"] = lambda: torch.nn.functional.linear(x, weight)
    if t <= 256:
        runs["fused"] = lambda: triton_ops.add_lora(y, x, la, lb, ids, 0.5, meta=meta, fused=True)
    for name, fn in runs.items():
        row[name + "_us"] = time_us(fn, device)
    pick_ours(row, gpu)
    return row


def timings(grid, device):
    bandwidth = copy_bandwidth(device)
    one_launch = launch_us(device)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, one tiny launch {one_launch:.1f} us",
          flush=True)
    rows = []
    for case in grid:
        row = bench_case(*case, device, bandwidth if device == "cuda" else 1e12)
        rows.append(row)
        print(format_row(row, one_launch), flush=True)
        torch.cuda.empty_cache() if device == "cuda" else None
    return dict(bandwidth=bandwidth, launch_us=one_launch, rows=rows)


# ---------------------------------------------------------------- reporting
def verdict(row, one_launch):
    best_torch = min(row["gather_bmm_us"], row["loop_us"])
    if row["tokens"] <= DECODE_MAX_TOKENS:
        ok = row["ours_us"] <= 2 * row["floor_us"] + one_launch and \
            row["gather_bmm_us"] >= 3 * row["ours_us"]
    else:
        ok = row["ours_us"] <= best_torch
    return "yes" if ok else "no"


def _f(v):
    return "-" if v is None else f"{v:.1f}"


HEADER = ("| K→N | rank | tokens | adapters | floor | ours | fused | unfused | gather-bmm | loop "
          "| base linear | ours/floor | target met | vLLM (anchor) |")


def format_row(row, one_launch):
    return (f"| {row['k']}→{row['n']} | {row['rank']} | {row['tokens']} | {row['adapters']} | "
            f"{_f(row['floor_us'])} | {_f(row['ours_us'])} | {_f(row.get('fused_us'))} | "
            f"{_f(row['unfused_us'])} | {_f(row['gather_bmm_us'])} | {_f(row['loop_us'])} | "
            f"{_f(row['base_linear_us'])} | {row['ours_us'] / row['floor_us']:.1f} | "
            f"{verdict(row, one_launch)} | {_f(VLLM_ANCHOR.get(_key(row)))} |")


def _key(row: dict) -> tuple:
    return row["k"], row["n"], row["rank"], row["tokens"], row["adapters"]


def pick_ours(row: dict, gpu: str) -> None:
    """'ours' = what the host rule (kernels/configs/<gpu>.json) picks for this shape."""
    from kernels import launch
    fused = row.get("fused_us") is not None and launch.use_fused(
        gpu, row["tokens"], row["adapters"], row["rank"], row["k"])
    row["auto_is_fused"] = fused
    row["ours_us"] = row["fused_us"] if fused else row["unfused_us"]


def summary(rows, one_launch) -> list[str]:
    decode = [r for r in rows if r["tokens"] <= DECODE_MAX_TOKENS]
    prefill = [r for r in rows if r["tokens"] > DECODE_MAX_TOKENS]
    met = lambda rs: sum(verdict(r, one_launch) == "yes" for r in rs)  # noqa: E731
    near = sum(r["ours_us"] <= 2 * r["floor_us"] + one_launch for r in decode)
    vs_bmm = [r["gather_bmm_us"] / r["ours_us"] for r in decode]
    vs_best = [min(r["gather_bmm_us"], r["loop_us"]) / r["ours_us"] for r in prefill]
    anchors = [VLLM_ANCHOR[_key(r)] / r["ours_us"] for r in rows if _key(r) in VLLM_ANCHOR]
    fast = sum(v >= 3 for v in vs_bmm)
    overhead = ", ".join(
        f"{r['k']}→{r['n']} r{r['rank']} {100 * r['ours_us'] / r['base_linear_us']:.0f}%"
        for r in decode if r["tokens"] == 16 and r["adapters"] == 8)
    return [
        f"- Decode (≤ {DECODE_MAX_TOKENS} tokens): {met(decode)}/{len(decode)} rows meet both "
        f"targets; {near}/{len(decode)} within 2× floor + one launch; {fast}/{len(decode)} "
        f"≥ 3× faster than gather-bmm (range {min(vs_bmm):.1f}–{max(vs_bmm):.1f}×).",
        f"- LoRA time as a share of the base linear layer at 16 tokens over 8 adapters "
        f"(ANCHORS goal ≤ 30%): {overhead}.",
        f"- Prefill: {met(prefill)}/{len(prefill)} rows at least as fast as the best torch "
        f"baseline (best-torch / ours {min(vs_best):.2f}–{max(vs_best):.1f}×).",
        f"- Against the vLLM anchors (shared/ANCHORS.md, measured earlier on an H200, not in "
        f"this run): vLLM / ours {min(anchors):.2f}–{max(anchors):.1f}× on the "
        f"{len(anchors)} matching rows." if anchors else "- No vLLM anchor rows matched.",
    ]


ANCHOR_BANDWIDTH = 4.28e12  # shared/ANCHORS.md's copy bandwidth on an H200


def render(result: dict) -> str:
    t = result["timings"]
    c = result["correctness"]
    # The stricter (higher) of the measured and the anchors' bandwidth sets the floor.
    bandwidth = max(t["bandwidth"], ANCHOR_BANDWIDTH)
    for row in t["rows"]:
        pick_ours(row, result["gpu"])
        row["floor_us"] = floor_bytes(row["k"], row["n"], row["rank"], row["tokens"],
                                      row["adapters"]) / bandwidth * 1e6
    graphs = result.get("graph_check")
    graph_text = (f"{sum(g['ok'] for g in graphs)}/{len(graphs)} match the reference"
                  if graphs else "not part of this run (see bench/kernels_notes.md)")
    lines = [
        "## Kernels",
        "",
        f"GPU: {result['gpu']} (torch {result['torch']}, triton {result['triton']}), produced by "
        f"`bench/kernels.py`. bf16, CUDA-graph replay, median, µs. Tokens spread evenly over "
        f"the adapters; weights cache-warm. Floor = bytes (x + active A and B + y read and "
        f"written) over {bandwidth / 1e12:.2f} TB/s, the higher of this run's measured "
        f"device-to-device copy ({t['bandwidth'] / 1e12:.2f} TB/s) and the anchors' 4.28 TB/s "
        f"(the stricter floor); one minimal kernel launch costs "
        f"{t['launch_us']:.1f} µs in graph replay. 'ours' = what the host rule in "
        f"kernels/configs/ picks between 'fused' (one launch) and 'unfused' (shrink + expand; "
        f"fused is timed up to 256 tokens). 'loop' = torch per-adapter "
        f"loop, 'gather-bmm' = vLLM's torch path. Targets: ≤ {DECODE_MAX_TOKENS} tokens within "
        f"2× floor + one launch and ≥ 3× faster than gather-bmm; prefill ≤ best torch. "
        f"'vLLM (anchor)' is copied from shared/ANCHORS.md: vLLM 0.33's kernels measured "
        f"earlier on an H200, NOT measured here (vLLM is not installed on the GPU machine).",
        "",
        f"GPU correctness before timing: {c['checks']} checks against the torch reference, "
        f"{len(c['failures'])} failures, worst bf16 relative error {c['worst_bf16_rel_err']:.1e}; "
        f"CUDA-graph replay (3 replays of a captured add_lora, fused and unfused): "
        f"{graph_text}.",
        "",
        *summary(t["rows"], t["launch_us"]),
        "",
        HEADER,
        "|" + "---|" * 14,
    ]
    lines += [format_row(r, t["launch_us"]) for r in t["rows"]]
    return "\n".join(lines) + "\n"


def write_section(results_path: Path, section: str) -> None:
    """Replace (or append) the '## Kernels' section of RESULTS.md, leaving other sections."""
    text = results_path.read_text() if results_path.exists() else "# Benchmark results\n\n"
    start = text.find("## Kernels")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + section + ("" if nxt < 0 else text[nxt:])
    results_path.write_text(text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--sweep", action="store_true", help="time candidate launch configs first")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny grid on CPU (interpreter)")
    p.add_argument("--render", type=Path, help="render this JSON into --results and exit")
    p.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    args = p.parse_args(argv)
    if args.render:
        write_section(args.results, render(json.loads(args.render.read_text())))
        return
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    grid = cases(SHAPES, RANKS, TOKENS, ADAPTERS) if device == "cuda" else \
        cases([(96, 160)], [16], [1, 16, 80], [1, 8])
    result = dict(gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
                  torch=torch.__version__, triton=triton.__version__)
    save = (lambda: args.out.write_text(json.dumps(result, indent=1))) if args.out else (
        lambda: None)
    result["correctness"] = correctness(grid, device, [torch.float16, torch.float32]) \
        if not args.skip_check else dict(checks=0, failures=[], worst_bf16_rel_err=0.0)
    save()
    if device == "cuda":
        result["graph_check"] = graph_check(device)
        save()
    if args.sweep and device == "cuda":
        result["sweep"] = sweep(device)
        save()
    print(HEADER, flush=True)
    result["timings"] = timings(grid, device)
    save()
    print(render(result))


if __name__ == "__main__":
    main()
