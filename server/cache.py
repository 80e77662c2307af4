"""The composition cache: memory LRU (bounded in bytes) over a disk cache of PEFT directories
(bounded in bytes, survives restarts) over a build function (the merge). The cache is built
with its collaborators: the build function, and hooks called when an entry enters or leaves
the memory tier (engine registration).

Every state change happens on the event loop; only file work and the build run in threads.
Concurrent requests for the same missing key share one build (single-flight).

The disk tier is best effort: when the cache directory cannot be written (read-only, full),
new entries live in the memory tier only (their files in a private scratch directory, since
engines load adapters from a path), the failure is logged once and counted, and serving goes
on. The disk tier itself (server/disk_tier.py) may be shared by several replicas: entries are
renamed into place complete, a complete entry is never replaced, and eviction spares what any
replica used within the grace period; anything found corrupt, of whatever shape, is discarded,
counted and merged again."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import merging
from safetensors import SafetensorError

from server import metrics
from server.composition import CompositionSpec
from server.composition_info import CompositionInfo
from server.disk_tier import INFO_NAME, DiskTier

logger = logging.getLogger("loramix.cache")

__all__ = ["INFO_NAME", "BuildFn", "CachedComposition", "CompositionCache"]

# build(spec, out_dir) merges `spec`, saves the adapter into out_dir, returns (adapter, info).
BuildFn = Callable[[CompositionSpec, Path], "tuple[merging.LoraAdapter, CompositionInfo]"]
# run(fn, *args) runs fn(*args) on a worker thread (default: asyncio.to_thread).
RunFn = Callable[..., Awaitable]
Hook = Callable[["CachedComposition"], Awaitable[None]]


@dataclass
class CachedComposition:
    """A merged adapter resident in the memory tier (and on disk at `path`)."""

    key: str
    path: Path
    adapter: merging.LoraAdapter
    info: CompositionInfo
    in_use: int = 0
    last_used: float = field(default_factory=time.time)
    on_disk: bool = True  # False: memory tier only, `path` is in the scratch directory
    touched: float = field(default_factory=time.time)  # when its disk entry was last marked used

    @property
    def rank(self) -> int:
        return self.adapter.max_rank

    @property
    def num_bytes(self) -> int:
        return self.adapter.num_bytes


def _is_disk_error(exc: BaseException) -> bool:
    """A failure to write files (safetensors reports its I/O errors as SafetensorError)."""
    return isinstance(exc, (OSError, SafetensorError))


class CompositionCache:
    """Memory LRU → disk → build, keyed by content-addressed composition keys."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        build: BuildFn,
        memory_bytes: int,
        disk_bytes: int,
        disk_grace_s: float = 600.0,
        on_admit: Hook | None = None,
        on_evict: Hook | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self._build = build
        self._on_admit = on_admit
        self._on_evict = on_evict
        self._memory: OrderedDict[str, CachedComposition] = OrderedDict()
        self.disk = DiskTier(self.cache_dir, grace_s=disk_grace_s, on_error=self._disk_failed)
        self._inflight: dict[str, asyncio.Task] = {}
        self._disk_ok = True
        self._scratch: Path | None = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self.disk.scan()
        except OSError as exc:
            self._disk_failed("scan", exc)

    # ------------------------------------------------------------------ disk tier

    def _disk_failed(self, operation: str, exc: BaseException) -> None:
        """Count a disk-tier failure; log the first of a run of failures (not every request)."""
        metrics.CACHE_DISK_ERRORS.labels(operation=operation).inc()
        if self._disk_ok:
            logger.warning("composition cache: the disk tier failed (%s: %s); new compositions are "
                           "kept in memory only until it works again", operation, type(exc).__name__)
        else:
            logger.debug("composition cache: disk %s failed again: %s", operation, exc)
        self._disk_ok = False

    def _disk_worked(self) -> None:
        if not self._disk_ok:
            logger.info("composition cache: the disk tier works again")
        self._disk_ok = True

    def _write(self, key: str, spec: CompositionSpec, tmp: Path) -> tuple[merging.LoraAdapter, CompositionInfo, Path, bool]:
        """Build `key` into the disk tier (through `tmp`), or into memory only when the disk
        fails. Returns (adapter, info, path, on_disk)."""
        build = functools.partial(self._build, spec)
        try:
            adapter, info = self.disk.write(key, build, tmp)
            self._disk_worked()
            return adapter, info, self.disk.path(key), True
        except Exception as exc:
            if not _is_disk_error(exc):
                raise
            self._disk_failed("write", exc)
        path = self._scratch_dir() / key
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        adapter, info = build(path)
        return adapter, dataclasses.replace(info, key=key, created=time.time()), path, False

    def _scratch_dir(self) -> Path:
        """This process's directory for memory-only entries (removed when the cache is)."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="loramix-memory-tier-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    async def _heartbeat(self, tmp: Path) -> None:
        """Touch a temp dir while its build runs, so other replicas see its writer is alive."""
        while True:
            await asyncio.sleep(self.disk.touch_interval_s)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(os.utime, tmp)

    async def _evict_disk(self, keep: str) -> None:
        protected = {keep, *self._memory, *self._inflight}
        try:
            evicted = await asyncio.to_thread(self.disk.evict, protected, self.disk_bytes)
        except OSError as exc:
            self._disk_failed("evict", exc)
            return
        metrics.CACHE_EVICTIONS.labels(tier="disk").inc(len(evicted))

    async def _keep_on_disk(self, entry: CachedComposition) -> None:
        """Touch an entry in use (at most once per touch interval) so no replica evicts it
        while this one's engine may reload it from its path; if another replica evicted it
        while it sat unused here, write it back from memory."""
        now = time.time()
        if not entry.on_disk or now - entry.touched < self.disk.touch_interval_s:
            return
        entry.touched = now
        if await asyncio.to_thread(self.disk.touch, entry.key):
            return
        logger.info("composition %s was evicted from the shared disk tier while in memory here; "
                    "writing it back", entry.key[:12])
        try:
            await asyncio.to_thread(self.disk.restore, entry.key, entry.adapter, entry.info)
        except Exception as exc:
            if not _is_disk_error(exc):
                raise
            self._disk_failed("write", exc)

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
                await self._drop_files(entry)
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
            await self._drop_files(entry)

    async def _drop_files(self, entry: CachedComposition) -> None:
        """A memory-only entry's files go with it (it has no disk tier to fall back to)."""
        if not entry.on_disk:
            await asyncio.to_thread(shutil.rmtree, entry.path, True)

    # ------------------------------------------------------------------ lookups

    async def _fill(self, key: str, spec: CompositionSpec, run: RunFn) -> None:
        """Bring `key` into the memory tier: from disk if there, else by building it (with `run`)."""
        loaded = await asyncio.to_thread(self.disk.read, key)
        path, on_disk = self.disk.path(key), True
        if loaded is not None:
            metrics.CACHE_HITS.labels(tier="disk").inc()
        else:
            metrics.CACHE_MISSES.inc()
            tmp = self.disk.new_tmp(key)
            heartbeat = asyncio.create_task(self._heartbeat(tmp))
            try:
                *loaded, path, on_disk = await run(self._write, key, spec, tmp)
            finally:
                heartbeat.cancel()
        adapter, info = loaded
        entry = CachedComposition(key=key, path=path, adapter=adapter, info=info, on_disk=on_disk)
        await self._admit(entry)
        await self._evict_disk(keep=key)

    async def acquire(self, key: str, spec: CompositionSpec, run: RunFn = asyncio.to_thread) -> CachedComposition:
        """The entry for `key` (the key of `spec`), pinned (not evictable) until `release` is called.

        Concurrent callers for a missing key await one shared `_fill`; a caller that goes
        away does not cancel it (others may be waiting). The build of `spec` runs through
        `run` (a merge pool's lane), the first caller's."""
        first = True
        while True:
            entry = self._memory.get(key)
            if entry is not None:
                if first:
                    metrics.CACHE_HITS.labels(tier="memory").inc()
                entry.in_use += 1
                entry.last_used = time.time()
                self._memory.move_to_end(key)
                try:
                    await self._keep_on_disk(entry)
                except BaseException:  # cancelled (client gone) or failed: unpin
                    await self.release(entry)
                    raise
                return entry
            first = False
            task = self._inflight.get(key)
            if task is None:
                task = asyncio.create_task(self._fill(key, spec, run))
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

    def peek(self, key: str) -> CompositionInfo | None:
        """The stored info of `key` without loading it (memory first, then disk), or None."""
        entry = self._memory.get(key)
        if entry is not None:
            return entry.info
        try:
            return CompositionInfo.from_json(json.loads((self.cache_dir / key / INFO_NAME).read_text()), key)
        except (OSError, ValueError):  # CorruptInfo is a ValueError
            return None

    def tier(self, key: str) -> str | None:
        """Where `key` is cached: "memory", "disk" or None."""
        if key in self._memory:
            return "memory"
        if key in self.disk.index:
            return "disk"
        return None

    def keys(self) -> list[str]:
        """Every cached key, memory tier first (most recent first), then disk."""
        memory = list(reversed(self._memory))
        return memory + [key for key in self.disk.index if key not in self._memory]

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
            await self._drop_files(entry)
        removed = await asyncio.to_thread(self.disk.remove, key)
        return entry is not None or removed

    async def clear_memory(self) -> None:
        """Drop the memory tier (engine shutdown)."""
        self._memory.clear()
