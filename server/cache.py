"""The composition cache: memory LRU (bounded in bytes) over a disk cache of PEFT directories
(bounded in bytes, survives restarts) over a build function (the merge).

Every state change happens on the event loop; only file work and the build run in threads.
Concurrent requests for the same missing key share one build (single-flight)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import merging

from server import metrics

logger = logging.getLogger("loramix.cache")

INFO_NAME = "composition.json"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"

# build(out_dir) merges, saves the adapter into out_dir and returns (adapter, info).
BuildFn = Callable[[Path], "tuple[merging.LoraAdapter, dict]"]
Hook = Callable[["CachedComposition"], Awaitable[None]]


@dataclass
class CachedComposition:
    """A merged adapter resident in the memory tier (and on disk at `path`)."""

    key: str
    path: Path
    adapter: merging.LoraAdapter
    info: dict
    in_use: int = 0
    last_used: float = field(default_factory=time.time)

    @property
    def rank(self) -> int:
        return self.adapter.max_rank

    @property
    def num_bytes(self) -> int:
        return self.adapter.num_bytes


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class CompositionCache:
    """Memory LRU → disk → build, keyed by content-addressed composition keys."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        memory_bytes: int,
        disk_bytes: int,
        on_admit: Hook | None = None,
        on_evict: Hook | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._on_admit = on_admit
        self._on_evict = on_evict
        self._memory: OrderedDict[str, CachedComposition] = OrderedDict()
        self._disk: dict[str, tuple[int, float]] = {}  # key -> (bytes, last used)
        self._inflight: dict[str, asyncio.Task] = {}
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._scan_disk()

    def set_hooks(self, on_admit: Hook | None, on_evict: Hook | None) -> None:
        """Called when an entry enters / leaves the memory tier (engine registration)."""
        self._on_admit = on_admit
        self._on_evict = on_evict

    # ------------------------------------------------------------------ disk tier

    def _scan_disk(self) -> None:
        """Index the disk tier; partial writes (temp dirs) from a crash are removed."""
        for entry in self.cache_dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and _KEY_RE.fullmatch(entry.name):
                self._disk[entry.name] = (_dir_bytes(entry), entry.stat().st_mtime)

    def _read_disk(self, key: str) -> tuple[merging.LoraAdapter, dict] | None:
        """The cached adapter and info for `key`, or None. A corrupted entry is deleted."""
        path = self.cache_dir / key
        if not path.is_dir():
            return None
        try:
            info = json.loads((path / INFO_NAME).read_text())
            if info.get("key") != key:
                raise ValueError("key mismatch")
            adapter = merging.load_adapter(path, name=key[:12])
        except (OSError, ValueError, merging.MergeError) as exc:
            logger.warning("discarding corrupted cache entry %s: %s", key[:12], exc)
            shutil.rmtree(path, ignore_errors=True)
            return None
        os.utime(path)
        return adapter, info

    def _write_disk(self, key: str, build: BuildFn) -> tuple[merging.LoraAdapter, dict]:
        """Build into a temp dir inside the cache dir, then rename it into place (atomic)."""
        tmp = self.cache_dir / f"{_TMP_PREFIX}{key[:16]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            adapter, info = build(tmp)
            info = {**info, "key": key, "created": time.time()}
            (tmp / INFO_NAME).write_text(json.dumps(info, sort_keys=True))
            final = self.cache_dir / key
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return adapter, info

    def _disk_victims(self, keep: str) -> list[str]:
        """Least recently used disk entries to delete so the tier fits its bound."""
        total = sum(size for size, _ in self._disk.values())
        victims = []
        for key, (size, _) in sorted(self._disk.items(), key=lambda item: item[1][1]):
            if total <= self.disk_bytes:
                break
            if key == keep or key in self._memory or key in self._inflight:
                continue
            victims.append(key)
            total -= size
        return victims

    async def _evict_disk(self, keep: str) -> None:
        for key in self._disk_victims(keep):
            self._disk.pop(key, None)
            await asyncio.to_thread(shutil.rmtree, self.cache_dir / key, True)
            metrics.CACHE_EVICTIONS.labels(tier="disk").inc()

    # ------------------------------------------------------------------ memory tier

    async def _admit(self, entry: CachedComposition) -> None:
        self._memory[entry.key] = entry
        self._memory.move_to_end(entry.key)
        if self._on_admit is not None:
            try:
                await self._on_admit(entry)
            except BaseException:
                # Not usable by the engine: it must not look like a memory hit next time.
                self._memory.pop(entry.key, None)
                raise
        await self._evict_memory(keep=entry.key)

    async def _evict_memory(self, keep: str) -> None:
        total = sum(e.num_bytes for e in self._memory.values())
        for key in list(self._memory):
            if total <= self.memory_bytes:
                break
            entry = self._memory.get(key)  # another task may have removed it meanwhile
            if entry is None or key == keep or entry.in_use > 0:
                continue
            del self._memory[key]
            total -= entry.num_bytes
            metrics.CACHE_EVICTIONS.labels(tier="memory").inc()
            if self._on_evict is not None:
                await self._on_evict(entry)

    # ------------------------------------------------------------------ lookups

    async def _fill(self, key: str, build: BuildFn) -> None:
        """Bring `key` into the memory tier: from disk if there, else by building it."""
        loaded = await asyncio.to_thread(self._read_disk, key)
        if loaded is not None:
            metrics.CACHE_HITS.labels(tier="disk").inc()
        else:
            self._disk.pop(key, None)
            metrics.CACHE_MISSES.inc()
            loaded = await asyncio.to_thread(self._write_disk, key, build)
        adapter, info = loaded
        path = self.cache_dir / key
        self._disk[key] = (await asyncio.to_thread(_dir_bytes, path), time.time())
        await self._admit(CachedComposition(key=key, path=path, adapter=adapter, info=info))
        await self._evict_disk(keep=key)

    async def acquire(self, key: str, build: BuildFn) -> CachedComposition:
        """The entry for `key`, pinned (not evictable) until `release` is called.

        Concurrent callers for a missing key await one shared `_fill`; a caller that goes
        away does not cancel it (others may be waiting)."""
        first = True
        while True:
            entry = self._memory.get(key)
            if entry is not None:
                if first:
                    metrics.CACHE_HITS.labels(tier="memory").inc()
                entry.in_use += 1
                entry.last_used = time.time()
                self._memory.move_to_end(key)
                return entry
            first = False
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._fill(key, build))
                self._inflight[key] = task
                task.add_done_callback(lambda t, k=key: self._finish(k, t))
            await asyncio.shield(task)

    def _finish(self, key: str, task: asyncio.Task) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            logger.info("building composition %s failed: %s", key[:12], task.exception())

    async def release(self, entry: CachedComposition) -> None:
        """Unpin an entry; evict what no longer fits now that it may be evictable."""
        entry.in_use = max(0, entry.in_use - 1)
        if entry.in_use == 0:
            await self._evict_memory(keep="")

    # ------------------------------------------------------------------ management

    def peek(self, key: str) -> dict | None:
        """The stored info of `key` without loading it (memory first, then disk), or None."""
        entry = self._memory.get(key)
        if entry is not None:
            return entry.info
        path = self.cache_dir / key / INFO_NAME
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def tier(self, key: str) -> str | None:
        """Where `key` is cached: "memory", "disk" or None."""
        if key in self._memory:
            return "memory"
        if key in self._disk:
            return "disk"
        return None

    def keys(self) -> list[str]:
        """Every cached key, memory tier first (most recent first), then disk."""
        memory = list(reversed(self._memory))
        return memory + [key for key in self._disk if key not in self._memory]

    async def discard(self, key: str) -> bool:
        """Remove `key` from both tiers (it is rebuilt on next use). False if it was absent
        or is in use by a running request."""
        entry = self._memory.get(key)
        if entry is not None:
            if entry.in_use > 0:
                return False
            del self._memory[key]
            if self._on_evict is not None:
                await self._on_evict(entry)
        found = entry is not None or key in self._disk
        self._disk.pop(key, None)
        await asyncio.to_thread(shutil.rmtree, self.cache_dir / key, True)
        return found

    async def clear_memory(self) -> None:
        """Drop the memory tier (engine shutdown)."""
        self._memory.clear()
