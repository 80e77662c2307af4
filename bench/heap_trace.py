"""Run `loramix serve` in this process under tracemalloc and write heap snapshots as it runs.

A profiling harness for the soak bench (`python -m bench.soak --heap-trace-every 60`), never
part of a production start-up. Tracing starts --warmup seconds after --ready-url first answers
(start-up traced would take many minutes); then every --every seconds it records the traced
Python heap, the process RSS, glibc's malloc statistics and the live object counts of the types
that grew, and writes the allocation sites that grew most since the first snapshot to
--out/heap_trace.json (rewritten at each snapshot, so a killed run keeps them).

    python -m bench.heap_trace --ready-url http://127.0.0.1:8000/health --every 60 --warmup 30 \
        --out /tmp/trace -- serve --port 8000 ...
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import threading
import time
import tracemalloc
import urllib.request
from collections import Counter
from pathlib import Path

NUM_FRAMES = 6  # traceback depth per allocation: enough to see who called the allocator
NUM_TOP = 25  # allocation sites listed per snapshot


def rss_mib() -> dict[str, float]:
    """VmRSS and its anonymous and file-backed parts, MiB."""
    fields = ("VmRSS", "RssAnon", "RssFile")
    return {name: round(int(rest.split()[0]) / 1024, 1) for name, _, rest in
            (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines()) if name in fields}


def malloc_mib() -> dict[str, float]:
    """glibc's view of its heap (mallinfo2): bytes in use, free in the arenas, and mmapped."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return {}
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    mib = 2**20
    return {"arena": info.arena / mib, "in_use": info.uordblks / mib, "free": info.fordblks / mib,
            "mmapped": info.hblkhd / mib}


def type_counts() -> Counter:
    return Counter(type(obj).__qualname__ for obj in gc.get_objects())


class HeapTracer(threading.Thread):
    def __init__(self, ready_url: str, every_s: float, warmup_s: float, out: Path) -> None:
        super().__init__(daemon=True)
        self.ready_url, self.every_s, self.warmup_s, self.out = ready_url, every_s, warmup_s, out
        self.baseline: tracemalloc.Snapshot | None = None
        self.baseline_types: Counter | None = None
        self.records: list[dict] = []
        self.t0 = time.monotonic()

    def run(self) -> None:
        # Start-up (imports, model load) runs untraced: traced, it takes many minutes here.
        while not _answers(self.ready_url):
            time.sleep(1)
        time.sleep(self.warmup_s)
        tracemalloc.start(NUM_FRAMES)
        while True:
            time.sleep(self.every_s)
            self.record()

    def record(self) -> None:
        snapshot = tracemalloc.take_snapshot().filter_traces([
            tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")])
        types = type_counts()
        if self.baseline is None:
            self.baseline, self.baseline_types = snapshot, types
        traced, _ = tracemalloc.get_traced_memory()
        record = {
            "t_s": round(time.monotonic() - self.t0, 1),
            "rss_mib": rss_mib(),
            "num_threads": threading.active_count(),
            "traced_mib": round(traced / 2**20, 2),
            "malloc_mib": {k: round(v, 1) for k, v in malloc_mib().items()},
            "grown_sites": [_site(stat) for stat in snapshot.compare_to(self.baseline, "traceback")[:NUM_TOP]],
            "grown_types": [(name, self.baseline_types.get(name, 0), count) for name, count in
                            (types - self.baseline_types).most_common(NUM_TOP)],
        }
        self.records.append(record)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "heap_trace.json").write_text(json.dumps(self.records, indent=1) + "\n")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _site(stat: tracemalloc.StatisticDiff) -> dict:
    return {"size_diff_kib": round(stat.size_diff / 1024, 1), "count_diff": stat.count_diff,
            "size_kib": round(stat.size / 1024, 1),
            "traceback": [f"{frame.filename}:{frame.lineno}" for frame in stat.traceback]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=float, default=60, help="seconds between snapshots")
    parser.add_argument("--ready-url", required=True, help="tracing starts once this URL answers 200 (/health)")
    parser.add_argument("--warmup", type=float, default=60, help="seconds of load after ready before tracing starts")
    parser.add_argument("--out", type=Path, required=True, help="directory for heap_trace.json")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- serve FLAGS...")
    args = parser.parse_args()
    HeapTracer(args.ready_url, args.every, args.warmup, args.out).start()
    from server.cli import app

    serve_args = args.serve_args[1:] if args.serve_args[:1] == ["--"] else args.serve_args
    app(args=serve_args, prog_name="loramix")


if __name__ == "__main__":
    main()
