"""Host cost of one add_lora call: the public checked path against the engine's planned path.

Run on a CUDA GPU (one H200 here; torch + triton only):
    PYTHONUNBUFFERED=1 python3 -m bench.host_overhead --out $OUT/host_overhead.json
For the Llama-1B layer shapes (2048->2048, 2048->512, 2048->8192, 8192->2048; rank 16; 32 tokens
over 8 adapters, 4 rows each; bf16) it measures, in one process:
  old     kernels.add_lora(y, x, lora_a, lora_b, slot_ids, meta=meta): checks, configs,
          workspace allocation and launches on every call (what the engine called before);
  lean    kernels.add_lora_planned(y, x, lora_a, lora_b, meta): checked and planned once per
          meta and signature, then only launched (what the engine calls now);
  per call, eager: `issue` = host time to enqueue N back-to-back calls / N, `wall` = the same
  with a synchronize at the end / N; and the kernels' own time by CUDA-graph replay (the same
  launches for both paths). Then one decode pass's 112 calls (16 layers x 7 projections) with
  both paths, and build_meta on its own (once per batch). A tiny torch op (y.add_(1)) times the
  host itself. `--smoke` runs tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LORAMIX_KERNELS", "triton")

import torch  # noqa: E402

import kernels  # noqa: E402
from bench.timing import graph_time_us  # noqa: E402

FULL = dict(shapes=[(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048)], rank=16, tokens=32,
            adapters=8, layers=16, calls=200, repeats=7, graph_inner=20, dtype=torch.bfloat16,
            device="cuda")
TINY = dict(shapes=[(64, 64), (64, 16), (64, 128), (128, 64)], rank=16, tokens=32, adapters=8,
            layers=1, calls=2, repeats=1, graph_inner=0, dtype=torch.float32, device="cpu")
# Llama-1B: q, k, v, o, gate, up, down as indices into `shapes`
PASS_ORDER = [0, 1, 1, 0, 2, 2, 3]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eager_us(fn, calls: int, repeats: int, device: str) -> tuple[float, float]:
    """(issue, wall) µs per call, medians over `repeats` runs of `calls` back-to-back calls."""
    issue, wall = [], []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        sync(device)
        done = time.perf_counter()
        issue.append((issued - start) / calls * 1e6)
        wall.append((done - start) / calls * 1e6)
    return statistics.median(issue), statistics.median(wall)




def make_layer(hidden_in: int, hidden_out: int, cfg: dict, seed: int):
    gen = torch.Generator().manual_seed(seed)
    dev, dtype, slots, rank = cfg["device"], cfg["dtype"], cfg["adapters"], cfg["rank"]
    x = torch.randn(cfg["tokens"], hidden_in, generator=gen).to(dev, dtype)
    lora_a = (torch.randn(slots, rank, hidden_in, generator=gen) / hidden_in ** 0.5).to(dev, dtype)
    lora_b = (torch.randn(slots, hidden_out, rank, generator=gen) / rank ** 0.5).to(dev, dtype)
    y = torch.randn(cfg["tokens"], hidden_out, generator=gen).to(dev, dtype)
    return y, x, lora_a, lora_b


def slot_ids(cfg: dict) -> torch.Tensor:
    """4 rows per adapter, as the engine bench's 32 requests over 8 adapters."""
    per = cfg["tokens"] // cfg["adapters"]
    ids = torch.arange(cfg["adapters"], dtype=torch.int32).repeat_interleave(per)
    return ids.to(cfg["device"])


def per_shape(cfg: dict, ids: torch.Tensor) -> list[dict]:
    rows = []
    for i, (k, n) in enumerate(cfg["shapes"]):
        y, x, lora_a, lora_b = make_layer(k, n, cfg, seed=i)
        meta = kernels.build_meta(ids, cfg["adapters"])
        old = lambda: kernels.add_lora(y, x, lora_a, lora_b, ids, meta=meta)  # noqa: E731
        lean = lambda: kernels.add_lora_planned(y, x, lora_a, lora_b, meta)  # noqa: E731
        want = kernels.add_lora(y.clone(), x, lora_a, lora_b, ids, meta=meta)
        got = kernels.add_lora_planned(y.clone(), x, lora_a, lora_b, meta)
        sync(cfg["device"])
        row = dict(hidden_in=k, hidden_out=n, bitwise_equal=bool(torch.equal(want, got)))
        for name, fn in (("old", old), ("lean", lean)):
            fn()
            row[f"{name}_issue_us"], row[f"{name}_wall_us"] = eager_us(
                fn, cfg["calls"], cfg["repeats"], cfg["device"])
        if cfg["graph_inner"]:
            row["old_graph_us"] = graph_time_us(old, cfg["graph_inner"])
            row["lean_graph_us"] = graph_time_us(lean, cfg["graph_inner"])
        rows.append(row)
        print(f"  {k}->{n}: " + ", ".join(f"{key} {v:.1f}" if isinstance(v, float) else
                                          f"{key} {v}" for key, v in row.items()
                                          if key not in ("hidden_in", "hidden_out")))
    return rows


def decode_pass(cfg: dict, ids: torch.Tensor) -> dict:
    """The 112 add_lora calls of one Llama-1B decode pass (7 projections x 16 layers; one set
    of weights per projection), old against lean, and build_meta on its own."""
    layers = [make_layer(*cfg["shapes"][s], cfg, seed=10 + j) for j, s in enumerate(PASS_ORDER)]
    meta = kernels.build_meta(ids, cfg["adapters"])

    def run(call):
        for _ in range(cfg["layers"]):
            for y, x, lora_a, lora_b in layers:
                call(y, x, lora_a, lora_b)

    old = lambda: run(lambda y, x, a, b: kernels.add_lora(y, x, a, b, ids, meta=meta))  # noqa: E731
    lean = lambda: run(lambda y, x, a, b: kernels.add_lora_planned(y, x, a, b, meta))  # noqa: E731

    def lean_fresh():  # a new batch: build_meta, then the first call of each signature plans
        fresh = kernels.build_meta(ids, cfg["adapters"], check=False)
        run(lambda y, x, a, b: kernels.add_lora_planned(y, x, a, b, fresh))

    build = lambda: kernels.build_meta(ids, cfg["adapters"], check=False)  # noqa: E731
    out = dict(calls=cfg["layers"] * len(PASS_ORDER))
    repeats = max(1, cfg["repeats"] // 2)
    for name, fn in (("old", old), ("lean", lean), ("lean_fresh_meta", lean_fresh),
                     ("build_meta", build)):
        fn()
        issue, wall = eager_us(fn, max(1, cfg["calls"] // 20), repeats, cfg["device"])
        out[f"{name}_issue_ms"], out[f"{name}_wall_ms"] = issue / 1e3, wall / 1e3
    return out


def host_probe(cfg: dict) -> float:
    """µs per y.add_(1) on a small tensor: the host's cost of one plain torch op."""
    y = torch.zeros(32, 2048, device=cfg["device"], dtype=cfg["dtype"])
    fn = lambda: y.add_(1)  # noqa: E731
    fn()
    return eager_us(fn, 10 * cfg["calls"], cfg["repeats"], cfg["device"])[0]


def table(rows: list[dict], pass_row: dict, probe: float) -> str:
    lines = ["| layer | old issue µs | old wall µs | lean issue µs | lean wall µs | "
             "saved µs/call | kernels µs (graph) | bitwise |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graph = f"{r['lean_graph_us']:.1f}" if "lean_graph_us" in r else "n/a"
        lines.append(f"| {r['hidden_in']}→{r['hidden_out']} | {r['old_issue_us']:.1f} | "
                     f"{r['old_wall_us']:.1f} | {r['lean_issue_us']:.1f} | "
                     f"{r['lean_wall_us']:.1f} | {r['old_wall_us'] - r['lean_wall_us']:.1f} | "
                     f"{graph} | {r['bitwise_equal']} |")
    p = pass_row
    lines += ["", f"decode pass, {p['calls']} calls (wall ms): old {p['old_wall_ms']:.2f}, "
              f"lean {p['lean_wall_ms']:.2f}, lean + new meta {p['lean_fresh_meta_wall_ms']:.2f}"
              f", build_meta alone {p['build_meta_wall_ms']:.3f}",
              f"host probe: one small torch op (y.add_(1)) issues in {probe:.1f} µs"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1 (checks the script)")
    args = parser.parse_args(argv)
    cfg = TINY if args.smoke else FULL
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke on CPU")
    import triton
    env = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               cpu=_cpu_name(), gpu=torch.cuda.get_device_name() if cfg["device"] == "cuda"
               else "cpu (TRITON_INTERPRET=1)")
    print(env)
    ids = slot_ids(cfg)
    rows = per_shape(cfg, ids)
    pass_row = decode_pass(cfg, ids)
    probe = host_probe(cfg)
    print(table(rows, pass_row, probe))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in cfg.items()}
        args.out.write_text(json.dumps(dict(env=env, config=config, per_shape=rows,
                                            decode_pass=pass_row, host_probe_us=probe),
                                       indent=1))
    if not all(r["bitwise_equal"] for r in rows):
        raise SystemExit("lean path differs from add_lora")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
