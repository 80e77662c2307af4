"""Merge speed: loramix vs peft's add_weighted_adapter on Llama-3-8B-shaped adapters.

Four synthetic rank-16 adapters on q,k,v,o,gate,up,down of 32 layers (fp32). loramix merges all
32 layers; peft needs a base model holding every adapted layer, so it runs on --peft-layers
layers of the same shapes and its time is extrapolated linearly to 32 (marked "extrap.").
Each case runs in a fresh subprocess so peak memory is its own (ru_maxrss). ΔW error is
||ΔW_merged - Σ w_i ΔW_i||_F / ||Σ w_i ΔW_i||_F on the layers both ran.

    python -m bench.merge_speed                     # full table (peft svd ≈ minutes)
    python -m bench.merge_speed --quick             # 4 layers for loramix, no peft svd
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.merge_speed` runs
HIDDEN, KV, INTER = 4096, 1024, 14336
SHAPES = {  # name -> (in, out)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, KV), "self_attn.v_proj": (HIDDEN, KV),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
    "mlp.down_proj": (INTER, HIDDEN),
}
RANK, NUM_ADAPTERS, ALPHA = 16, 4, 32
WEIGHTS = [0.25] * NUM_ADAPTERS


def factors(adapter: int, layer: int, module: str):
    """Deterministic synthetic factors (A ~ kaiming-like, B non-zero)."""
    gen = torch.Generator().manual_seed(adapter * 100_003 + layer * 101 + zlib.crc32(module.encode()) % 997)
    inp, out = SHAPES[module]
    return torch.randn(RANK, inp, generator=gen) / inp**0.5, torch.randn(out, RANK, generator=gen) * 0.02


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def exact_error(layers: int, fetch) -> float | None:
    """Relative ΔW error of `fetch(layer, module) -> dense ΔW` against the exact weighted sum."""
    err = tot = 0.0
    for layer in range(layers):
        for module in SHAPES:
            exact = sum(
                w * (ALPHA / RANK) * (b.double() @ a.double())
                for w, (a, b) in zip(WEIGHTS, (factors(i, layer, module) for i in range(NUM_ADAPTERS)))
            )
            got = fetch(layer, module).double()
            err += float((got - exact).pow(2).sum())
            tot += float(exact.pow(2).sum())
    return (err / tot) ** 0.5 if tot > 0 else None


def run_loramix(method: str, layers: int, error_layers: int) -> dict:
    from merging import LoraAdapter, LoraModule, get_method, merge

    adapters = [
        LoraAdapter({
            f"model.layers.{layer}.{m}": LoraModule(*factors(i, layer, m), ALPHA / RANK)
            for layer in range(layers) for m in SHAPES
        })
        for i in range(NUM_ADAPTERS)
    ]
    setup = rss_mb()
    start = time.perf_counter()
    result = merge(adapters, WEIGHTS, method, rank=RANK if get_method(method).takes_rank else None)
    seconds, peak = time.perf_counter() - start, peak_mb()
    merged = result.adapter.modules
    error = exact_error(error_layers, lambda l, m: merged[f"model.layers.{l}.{m}"].delta())
    return {"seconds": seconds, "extra_mb": peak - setup, "peak_mb": peak, "error": error,
            "rank": result.info["rank"]}


class Skeleton(torch.nn.Module):
    """The adapted linear layers of `layers` Llama-3-8B blocks, with uninitialised base weights."""

    def __init__(self, layers: int):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList()
        for _ in range(layers):
            block = torch.nn.Module()
            block.self_attn, block.mlp = torch.nn.Module(), torch.nn.Module()
            for name, (inp, out) in SHAPES.items():
                parent, leaf = name.split(".")
                setattr(getattr(block, parent), leaf, torch.nn.Linear(inp, out, bias=False, device="meta"))
            self.model.layers.append(block)
        self.to_empty(device="cpu")


def run_peft(method: str, layers: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[n.split(".")[1] for n in SHAPES])
    model = get_peft_model(Skeleton(layers), config, adapter_name="s0")
    for i in range(1, NUM_ADAPTERS):
        model.add_adapter(f"s{i}", config)
    layers_by_name = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    with torch.no_grad():
        for name, module in layers_by_name.items():
            layer, leaf = int(name.split(".layers.")[1].split(".")[0]), ".".join(name.split(".")[-2:])
            for i in range(NUM_ADAPTERS):
                a, b = factors(i, layer, leaf)
                module.lora_A[f"s{i}"].weight.copy_(a)
                module.lora_B[f"s{i}"].weight.copy_(b)
    setup = rss_mb()
    start = time.perf_counter()
    model.add_weighted_adapter([f"s{i}" for i in range(NUM_ADAPTERS)], WEIGHTS, "merged",
                               combination_type=method, svd_rank=RANK, density=0.5)
    seconds, peak = time.perf_counter() - start, peak_mb()

    def fetch(layer, module):
        return layers_by_name[f"base_model.model.model.layers.{layer}.{module}"].get_delta_weight("merged").detach()

    return {"seconds": seconds, "extra_mb": peak - setup, "peak_mb": peak,
            "error": exact_error(layers, fetch) if method in ("cat", "linear", "svd") else None}


def worker(args) -> None:
    torch.set_grad_enabled(False)
    if args.impl == "loramix":
        out = run_loramix(args.method, args.layers, args.error_layers)
    else:
        out = run_peft(args.method, args.layers)
    print("RESULT " + json.dumps(out))


def spawn(impl: str, method: str, layers: int, error_layers: int = 1) -> dict:
    cmd = [sys.executable, "-m", "bench.merge_speed", "--worker", impl, method, str(layers), str(error_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise SystemExit(f"{impl} {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="layers merged by loramix")
    parser.add_argument("--peft-layers", type=int, default=1, help="layers merged by peft (extrapolated)")
    parser.add_argument("--quick", action="store_true", help="4 layers, skip peft's svd/ties_svd")
    parser.add_argument("--skip-peft-ties-svd", action="store_true", help="peft ties_svd takes longest")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "METHOD", "LAYERS", "ERROR_LAYERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        impl, method, layers, error_layers = args.worker
        return worker(argparse.Namespace(impl=impl, method=method, layers=int(layers), error_layers=int(error_layers)))
    layers = 4 if args.quick else args.layers
    pl = args.peft_layers
    plan = [("cat", "cat"), ("linear", "linear"), ("svd", "svd"), ("ties", "ties_svd"), ("lego", None),
            ("knots", None), ("core", None)]
    rows = []
    for ours, peft_method in plan:
        dense = ours == "ties"  # dense-ΔW methods: both sides on the subset, both extrapolated
        mine_layers = pl if dense else layers
        mine = spawn("loramix", ours, mine_layers, error_layers=pl)
        row = {"method": ours, "loramix_s": mine["seconds"] * layers / mine_layers,
               "loramix_extrapolated": mine_layers != layers, "loramix_extra_mb": mine["extra_mb"],
               "loramix_error": mine["error"], "peft_method": peft_method}
        skip = peft_method is None or (args.quick and peft_method in ("svd", "ties_svd")) or (
            args.skip_peft_ties_svd and peft_method == "ties_svd")
        if not skip:
            theirs = spawn("peft", peft_method, pl)
            row.update(peft_s=theirs["seconds"] * layers / pl, peft_extra_mb=theirs["extra_mb"],
                       peft_error=theirs["error"], peft_extrapolated=pl != layers)
        rows.append(row)
        print(f"  done: {ours}", file=sys.stderr, flush=True)
    print_table(rows, layers, pl)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def print_table(rows, layers, peft_layers):
    cpu = platform.processor() or platform.machine()
    print(f"\nMerge speed, {NUM_ADAPTERS} rank-{RANK} adapters, Llama-3-8B shapes, {layers} layers, fp32, "
          f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}")
    print(f"peft ran {peft_layers} layer(s), its time scaled ×{layers / peft_layers:g} (extrap.)\n")
    print("| method (peft) | loramix s | peft s | speed-up | loramix ΔW err | peft ΔW err | loramix extra MB | peft extra MB (subset) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = r["peft_s"] / r["loramix_s"] if r.get("peft_s") else None
        peft_s = _fmt(r.get("peft_s"), ".2f") + (" extrap." if r.get("peft_extrapolated") else "")
        ours_s = f"{r['loramix_s']:.2f}" + (" extrap." if r.get("loramix_extrapolated") else "")
        print(f"| {r['method']} ({r['peft_method'] or 'n/a'}) | {ours_s} | {peft_s} | "
              f"{_fmt(speedup, '.0f' if speedup and speedup >= 10 else '.2f')}× | {_fmt(r['loramix_error'], '.2e')} | {_fmt(r.get('peft_error'), '.2e')} | "
              f"{r['loramix_extra_mb']:.0f} | {_fmt(r.get('peft_extra_mb'), '.0f')} |")


if __name__ == "__main__":
    main()
