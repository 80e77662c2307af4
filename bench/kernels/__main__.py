"""Command line of the kernels benchmark (see bench/kernels/__init__.py): `python -m bench.kernels`."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.kernels import __doc__ as DESCRIPTION
from bench.kernels.check import correctness, graph_check
from bench.kernels.grid import ADAPTERS, COMBOS, RANKS, SHAPES, TOKENS, cases
from bench.kernels.render import HEADER, render, write_section
from bench.kernels.sweep import sweep
from bench.kernels.timing import timings


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=DESCRIPTION.splitlines()[0])
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--sweep", action="store_true", help="time candidate launch configs first")
    p.add_argument("--skip-check", action="store_true")
    p.add_argument("--smoke", "--dry-run", action="store_true",
                   help="tiny grid on CPU (interpreter) through every step")
    p.add_argument("--jobs", type=int, default=None,
                   help="worker processes for the correctness grid (default 12 on a GPU)")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="past this many seconds from the start, time with fewer repetitions")
    p.add_argument("--render", type=Path, help="render this JSON into --results and exit")
    p.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    return p.parse_args(argv)


def check(result: dict, grid, device: str, gpu: str, args, save: Callable[[], None]) -> None:
    """Correctness (and on a GPU the graph replay check and the optional sweep) before timing."""
    jobs = args.jobs or (12 if device == "cuda" else 1)
    result["correctness"] = correctness(grid, device, gpu, jobs, spot=device == "cuda") \
        if not args.skip_check else dict(checks=0, failures=[], worst_bf16_rel_err=0.0)
    save()
    if device == "cuda":
        result["graph_check"] = graph_check(device)
        save()
    if args.sweep and device == "cuda":
        result["sweep"] = sweep(device)
        save()


def time_all(result: dict, grid, device: str, args, start: float, save: Callable[[], None]) -> None:
    """Timings, saved row by row; an interrupt (the driver's timeout) keeps what was measured."""
    print(HEADER, flush=True)

    def save_rows(timing):
        result["timings"] = timing
        save()
    try:
        timings(grid, device, save_rows, args.deadline_s, start)
    except KeyboardInterrupt:
        result.setdefault("timings", dict(bandwidth=float("nan"), launch_us=float("nan"),
                                          rows=[]))["truncated"] = True
        save()
        print("timings interrupted: partial rows saved", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.render:
        write_section(args.results, render(json.loads(args.render.read_text())))
        return
    start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from kernels import launch
    grid = cases(SHAPES, RANKS, TOKENS, ADAPTERS) if device == "cuda" else \
        cases([(96, 160)], [16], [1, 16, 80], [1, 8])
    gpu, _ = launch.device_key(torch.device(device))
    result = dict(gpu=gpu if device == "cuda" else "cpu (smoke run)", torch=torch.__version__,
                  triton=triton.__version__, combos=COMBOS)
    save = (lambda: args.out.write_text(json.dumps(result, indent=1))) if args.out else (
        lambda: None)
    check(result, grid, device, gpu, args, save)
    time_all(result, grid, device, args, start, save)
    print(f"total {time.perf_counter() - start:.0f}s", flush=True)
    print(render(result))


if __name__ == "__main__":
    main()
