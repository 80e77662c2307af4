"""GPU timing shared by the benches: median per-call time by CUDA-graph replay, and paired
samples of two (or more) callables taking turns, by graph replay or eagerly behind a queued
GPU spin (kernel time without the host's launch gaps)."""

from __future__ import annotations

import statistics

import torch


def _capture(fn, inner: int) -> torch.cuda.CUDAGraph:
    """`inner` calls of fn captured in one CUDA graph (after an eager and a side-stream warm-up,
    as torch's docs ask), replayed once."""
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
    return graph


def _events() -> tuple[torch.cuda.Event, torch.cuda.Event]:
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def graph_time_us(fn, inner: int, replays: int = 15) -> float:
    """Median time of one fn() call: `inner` calls captured in a CUDA graph, timed by replay."""
    return statistics.median(graph_pair_samples([fn], inner, replays)[0])


def graph_pair_samples(fns, inner: int, replays: int = 21) -> list[list[float]]:
    """Per-call times (µs) of each fn, one sample per replay of its graph of `inner` calls;
    the graphs replay in turns, so drift on the GPU falls on each alike and sample i of one
    pairs with sample i of another."""
    graphs = [_capture(fn, inner) for fn in fns]
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(replays):
        for graph, times in zip(graphs, samples):
            start, end = _events()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / inner)
    del graphs
    return samples


_SPIN_CYCLES_PER_US: float | None = None


def _spin_cycles_per_us() -> float:
    """torch.cuda._sleep's clock cycles per µs on this GPU (measured once)."""
    global _SPIN_CYCLES_PER_US
    if _SPIN_CYCLES_PER_US is None:
        cycles = 10_000_000
        torch.cuda._sleep(cycles // 10)  # first call: launch set-up out of the way
        start, end = _events()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SPIN_CYCLES_PER_US = cycles / (start.elapsed_time(end) * 1e3)
    return _SPIN_CYCLES_PER_US


def queued_pair_samples(fns, inner: int, reps: int = 21,
                        lead_us: float = 20_000) -> tuple[list[list[float]], float]:
    """GPU time per call (µs) of each fn run eagerly, taking turns rep by rep: a GPU spin of
    lead_us is queued first, so the host has launched all `inner` calls before the GPU
    reaches them, and the events around them time the kernels back to back, not the host's
    launches (the eager steps vLLM runs over its largest graph size overlap their launches
    with the GPU's work the same way when the GPU is the busier). Returns the samples and
    the share of reps where the host did finish launching before the spin ended (below 1:
    raise lead_us; those reps include launch gaps)."""
    cycles = int(lead_us * _spin_cycles_per_us())
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    samples: list[list[float]] = [[] for _ in fns]
    ahead = 0
    for _ in range(reps):
        for fn, times in zip(fns, samples):
            start, end = _events()
            torch.cuda._sleep(cycles)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            ahead += not start.query()  # the GPU was still spinning when the last launch went
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / inner)
    return samples, ahead / (reps * len(fns))
