"""loramix's LocalEngine under the benchmark: batches in flight at once, graph replays checked
against the eager forward, replay device time, and a profile of the worker thread."""

from __future__ import annotations

import asyncio
import time

import torch

from bench.engine_gpu.measure import summary, sync

# LocalEngine options of each mode compared (--modes); the first is the headline figure.
MODES = {
    "graphs": {"kv_cache": "static"},  # static KV cache, decode replayed from CUDA graphs
    "eager": {"kv_cache": "static", "enforce_eager": True},  # the same, launched eagerly
    "dynamic": {"kv_cache": "dynamic"},  # DynamicCache, eager (the engine before graphs)
    # eager with one fused launch per layer at decode sizes (the engine_fused setting)
    "eager_fused": {"kv_cache": "static", "enforce_eager": True, "engine_fused": "decode"},
}
MODE_LABELS = {"graphs": "CUDA graphs", "eager": "static KV, eager",
               "dynamic": "dynamic KV, eager", "eager_fused": "static KV, eager, fused decode"}


async def engine_batch(engine, prompts, handles, new_tokens, tag, device) -> dict:
    """Submit every request at once (row i uses handles[i]); time until all have finished."""
    from server.engines.base import SamplingOptions

    sampling = SamplingOptions(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)

    async def one(i):
        tokens = []
        async for delta in engine.generate(f"{tag}-{i}", prompts[i], sampling, handles[i]):
            tokens.extend(delta.token_ids)
        return tokens

    passes_before = engine.health()["num_forward_passes"]
    sync(device)
    start = time.perf_counter()
    outputs = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    sync(device)
    seconds = time.perf_counter() - start
    produced = sum(len(o) for o in outputs)
    if any(len(o) != new_tokens for o in outputs):
        raise RuntimeError(f"{tag}: a request returned {sorted({len(o) for o in outputs})} "
                           f"tokens, expected {new_tokens}")
    passes = engine.health()["num_forward_passes"] - passes_before
    return {"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
            "forward_passes": passes, "ms_per_pass": 1e3 * seconds / passes,
            "outputs": outputs}


async def profile_engine(engine, prompts, rows_by_kind, new_tokens, device, top: int) -> dict:
    """cProfile of the engine's worker thread (where every forward pass runs) over one batch of
    each kind: the Python functions with the most own time, to find where the host spends a
    mixed pass that a base pass does not. cProfile slows Python down; read it as shares."""
    import cProfile
    import io
    import pstats

    loop = asyncio.get_running_loop()
    worker = engine._executor  # the single thread that runs the model (see LocalEngine)
    tables = {}
    for kind, rows in rows_by_kind.items():
        profiler = cProfile.Profile()
        await loop.run_in_executor(worker, profiler.enable)
        run = await engine_batch(engine, prompts, rows, new_tokens, f"prof-{kind}", device)
        await loop.run_in_executor(worker, profiler.disable)
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream).sort_stats("tottime")
        stats.print_stats(top)
        total = sum(entry[2] for entry in stats.stats.values())
        print(f"\n== profile: {kind}, {run['forward_passes']} passes, {run['ms_per_pass']:.2f} ms/pass "
              f"(profiled), {1e3 * total / max(run['forward_passes'], 1):.2f} ms of Python per pass ==\n"
              + stream.getvalue(), flush=True)
        ranked = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:top]
        tables[kind] = {
            "ms_per_pass": run["ms_per_pass"], "passes": run["forward_passes"],
            "top_tottime_ms_per_pass": [
                {"function": f"{path}:{line}({name})", "calls": calls,
                 "ms_per_pass": 1e3 * tottime / max(run["forward_passes"], 1)}
                for (path, line, name), (_, calls, tottime, _, _) in ranked],
        }
    return tables


def check_replays(engine, limit: int) -> list[tuple[float, float]]:
    """Make the engine's first `limit` graph replays also run the same forward eagerly, twice,
    on the same inputs (the forward is idempotent for them) and record (max |replay - eager|,
    max |eager - eager again|) of the logits: 0.0 means bitwise the same; the second is the
    run-to-run noise floor of the eager computation itself."""
    decoder = engine._runner.decoder
    replay, diffs = decoder._replay, []

    def checked(rows, width, is_lora):
        logits = replay(rows, width, is_lora).clone()
        if len(diffs) < limit:
            first, second = decoder._forward(rows, width), decoder._forward(rows, width)
            diffs.append((float((logits - first).abs().max()),
                          float((first - second).abs().max())))
        return logits

    decoder._replay = checked
    return diffs


def time_replays(engine, device: str, count: int = 50) -> dict[str, float]:
    """GPU time of one replay of each captured decode graph (ms, mean of `count` back-to-back
    replays between CUDA events), with the engine idle: the pass's device time without the
    host's per-step work (input copies, sampling, detokenizing, streaming)."""
    times = {}
    for (rows, width, is_lora), (graph, _) in sorted(engine._runner.decoder.graphs.items()):
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(count):
            graph.replay()
        end.record()
        sync(device)
        label = f"{rows} rows x {width} columns, {'LoRA' if is_lora else 'base'}"
        times[label] = start.elapsed_time(end) / count
        print(f"  graph replay {label}: {times[label]:.3f} ms", flush=True)
    return times


async def bench_engine(base_dir, adapter_dirs, prompts, cfg, repeats, deadline,
                       profile_top: int = 0, options: dict | None = None) -> dict:
    from server.engines.base import AdapterHandle
    from server.engines.local import LocalEngine, LocalSettings

    engine = LocalEngine(base_dir, LocalSettings(max_loras=len(adapter_dirs), max_lora_rank=cfg["rank"],
                                                 dtype=cfg["dtype"], device=cfg["device"],
                                                 max_batch_size=cfg["requests"], **(options or {})))
    await engine.start()
    diffs = check_replays(engine, 64) if engine.cuda_graphs else []
    handles = [AdapterHandle(i + 1, f"skill{i}", path, rank=cfg["rank"])
               for i, path in enumerate(adapter_dirs)]
    for handle in handles:
        await engine.add_adapter(handle)
    per_row = len(prompts) // len(handles)
    mixed = [handles[i // per_row] for i in range(len(prompts))]
    base = [None] * len(prompts)
    new = cfg["new_tokens"]
    # Warm-up at the timed lengths: Triton compiles the prefill and decode kernels, the
    # adapters enter their slots, and attention meets every KV length once. (A warm-up of 8
    # new tokens was not enough on the H200: the first full-length run was 3x slower.)
    t = time.perf_counter()
    await engine_batch(engine, prompts, mixed, new, "warm-mixed", cfg["device"])
    await engine_batch(engine, prompts, base, new, "warm-base", cfg["device"])
    health = engine.health()
    print(f"  engine warm-up {time.perf_counter() - t:.1f} s ({health['kv_cache']} KV cache, "
          f"{health['num_cuda_graphs']} CUDA graphs)", flush=True)
    if engine.cuda_graphs:
        del engine._runner.decoder._replay  # timed runs replay without the check
        print(f"  graph replay vs eager, {len(diffs)} steps: max |logit diff| "
              f"{max((d[0] for d in diffs), default=float('nan')):.3g} (eager vs eager: "
              f"{max((d[1] for d in diffs), default=float('nan')):.3g})", flush=True)
    if profile_top:
        tables = await profile_engine(engine, prompts, {"base": base, "mixed": mixed},
                                      min(new, 32), cfg["device"], profile_top)
        await engine.shutdown()
        return {"profile": tables}
    results = {"base": [], "mixed": []}
    for rep in range(repeats):
        if rep and time.monotonic() > deadline:
            print("  time budget reached: fewer repeats", flush=True)
            break
        for kind, rows in (("base", base), ("mixed", mixed)):
            run = await engine_batch(engine, prompts, rows, new, f"{kind}{rep}", cfg["device"])
            print(f"  loramix {kind:5s} run {rep}: {run['tokens_per_s']:8.1f} tok/s "
                  f"({run['seconds']:.2f} s, {run['forward_passes']} passes, "
                  f"{run['ms_per_pass']:.2f} ms/pass)", flush=True)
            results[kind].append(run)
    health = engine.health()
    replay_ms = time_replays(engine, cfg["device"]) if engine.cuda_graphs else {}
    await engine.shutdown()
    outputs = {k: v[-1].pop("outputs") for k, v in results.items()}
    for runs in results.values():
        for run in runs:
            run.pop("outputs", None)
    return {"base": summary(results["base"]), "mixed": summary(results["mixed"]),
            "options": options or {}, "kv_cache": health["kv_cache"],
            "cuda_graphs": health["cuda_graphs"], "num_cuda_graphs": health["num_cuda_graphs"],
            "replay_vs_eager_max_abs_diff": max(d[0] for d in diffs) if diffs else None,
            "eager_vs_eager_max_abs_diff": max(d[1] for d in diffs) if diffs else None,
            "graph_replay_ms": replay_ms,
            "replay_checks": len(diffs),
            "max_adapters_per_pass": health["max_adapters_per_pass"],
            "adapter_loads": health["adapter_loads"], "outputs": outputs}
