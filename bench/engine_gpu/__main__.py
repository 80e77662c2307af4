"""Command line of the engine benchmark (see bench/engine_gpu/__init__.py): `python -m bench.engine_gpu`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.engine_gpu import __doc__ as DESCRIPTION
from bench.engine_gpu.baseline import bench_hf
from bench.engine_gpu.engine import MODES, bench_engine
from bench.engine_gpu.model import (
    FULL,
    SPECIAL,
    TINY,
    build_adapters,
    build_base,
    environment,
)
from bench.engine_gpu.report import overhead, render, same_rows


def parse_args() -> tuple[argparse.Namespace, list[str], dict]:
    """The arguments, the engine modes to time and the model/run configuration."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine_gpu",
                                     description=DESCRIPTION.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (script check)")
    parser.add_argument("--device", help="override the device (e.g. --tiny --device cuda: "
                        "the tiny float32 model on the GPU, where the modes must agree)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (loramix, base HF)")
    parser.add_argument("--peft-repeats", type=int, default=1, help="timed runs of peft mixed")
    parser.add_argument("--budget-s", type=float, default=300.0,
                        help="after this many seconds, stop starting extra repeats")
    parser.add_argument("--modes", default="graphs,eager,dynamic",
                        help=f"comma-separated engine modes to time, of {sorted(MODES)}")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="instead of timing: profile one base and one mixed batch of the "
                             "engine (32 new tokens) and print the TOP ops by self CPU time")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must name some of {sorted(MODES)}")
    cfg = dict(TINY if args.tiny else FULL, adapters=args.adapters, rank=args.rank)
    cfg["head_dim"] = cfg["hidden"] // cfg["heads"]
    if args.device:
        cfg["device"] = args.device
    if cfg["requests"] % cfg["adapters"]:
        parser.error("the number of requests must be a multiple of --adapters")
    return args, modes, cfg


def run_modes(args, modes, cfg, env, base_dir, adapter_dirs, prompts, deadline) -> dict:
    """The engine in each mode; a partial result is written after each (kept in case the
    baselines do not finish inside the device lease)."""
    by_mode = {}
    for mode in modes:
        print(f"loramix LocalEngine, mode {mode}: {MODES[mode]}", flush=True)
        by_mode[mode] = asyncio.run(bench_engine(base_dir, adapter_dirs, prompts, cfg,
                                                 args.repeats, deadline, args.profile,
                                                 MODES[mode]))
        if args.profile:
            continue
        write(args.out, {"environment": env, "config": cfg, "partial": True, "loramix_modes": {
            m: {k: v for k, v in r.items() if k != "outputs"} for m, r in by_mode.items()}})
        gc.collect()
    return by_mode


def checks(cfg: dict, modes: list[str], outputs: dict, hf_out: dict) -> dict:
    """Checks, not speed: adapters change every row; bf16 batched greedy decoding may
    legitimately drift between implementations, so agreement is reported, not required."""
    ours_out = outputs[modes[0]]
    return {
        "rows": cfg["requests"],
        "loramix_mixed_rows_differing_from_base": cfg["requests"] - same_rows(
            ours_out["mixed"], ours_out["base"]),
        "loramix_vs_transformers_base_rows_identical": same_rows(ours_out["base"],
                                                                 hf_out["base"]),
        "loramix_vs_peft_mixed_rows_identical": same_rows(ours_out["mixed"], hf_out["mixed"]),
        "loramix_vs_peft_mixed_first_token_identical": sum(
            a[0] == b[0] for a, b in zip(ours_out["mixed"], hf_out["mixed"])),
        **{f"{modes[0]}_vs_{m}_{kind}_rows_identical": same_rows(ours_out[kind], out[kind])
           for m, out in outputs.items() if m != modes[0] for kind in ("base", "mixed")},
    }


def assemble(env, cfg, modes, by_mode, hf) -> dict:
    """The result: environment, configuration, every mode, the baselines, overheads, checks."""
    outputs = {mode: run.pop("outputs") for mode, run in by_mode.items()}
    ours = by_mode[modes[0]]
    return {
        "environment": env,
        "config": cfg,
        "mode": modes[0],
        "loramix": ours,
        "loramix_modes": by_mode,
        "transformers": hf,
        "overhead_percent": {"loramix": overhead(ours["base"], ours["mixed"]),
                             "peft": overhead(hf["base"], hf["mixed"]),
                             **{f"loramix_{m}": overhead(r["base"], r["mixed"])
                                for m, r in by_mode.items()}},
        "checks": checks(cfg, modes, outputs, hf.pop("outputs")),
    }


def main() -> None:
    args, modes, cfg = parse_args()
    deadline = time.monotonic() + args.budget_s
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    env = environment(cfg)
    print(json.dumps(env), flush=True)
    gen = torch.Generator().manual_seed(1234)
    prompts = torch.randint(len(SPECIAL), cfg["vocab"], (cfg["requests"], cfg["prompt"]),
                            generator=gen).tolist()
    with tempfile.TemporaryDirectory(prefix="loramix-engine-bench-") as tmp:
        t = time.perf_counter()
        base_dir = build_base(Path(tmp) / "base", cfg)
        adapter_dirs = build_adapters(Path(tmp) / "skills", cfg, cfg["adapters"], cfg["rank"])
        gc.collect()
        print(f"built model and {len(adapter_dirs)} adapters in {time.perf_counter() - t:.1f} s",
              flush=True)
        by_mode = run_modes(args, modes, cfg, env, base_dir, adapter_dirs, prompts, deadline)
        if args.profile:
            write(args.out, {"environment": env, "config": cfg, "modes": by_mode})
            return
        gc.collect()
        if cfg["device"].startswith("cuda"):
            torch.cuda.empty_cache()
        hf = bench_hf(base_dir, adapter_dirs, prompts, cfg, args.repeats, args.peft_repeats,
                      deadline)
    result = assemble(env, cfg, modes, by_mode, hf)
    table = render(result)
    result["markdown"] = table
    print(json.dumps(result["checks"]), flush=True)
    print("\n" + table, flush=True)
    write(args.out, result)


def write(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
