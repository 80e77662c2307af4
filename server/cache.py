"""The composition cache: memory LRU (bounded in bytes) over a disk cache of PEFT directories
(bounded in bytes, survives restarts) over a build function (the merge).

Every state change happens on the event loop; only file work and the build run in threads.
Concurrent requests for the same missing key share one build (single-flight).

The disk tier is best effort: when the cache directory cannot be written (read-only, full),
new entries live in the memory tier only (their files in a private scratch directory, since
engines load adapters from a path), the failure is logged once and counted, and serving goes
on. Entries are written to a temp dir and renamed into place, so a crash never leaves an entry
that is served; anything found corrupt, of whatever shape, is discarded, counted and merged
again."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import merging
from merging.adapter import CONFIG_NAME, WEIGHTS_NAME
from safetensors import SafetensorError

from server import metrics

logger = logging.getLogger("loramix.cache")

INFO_NAME = "composition.json"
_KEY_RE = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"

# build(out_dir) merges, saves the adapter into out_dir and returns (adapter, info).
BuildFn = Callable[[Path], "tuple[merging.LoraAdapter, dict]"]
# run(fn, *args) runs fn(*args) on a worker thread (default: asyncio.to_thread).
RunFn = Callable[..., Awaitable]
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
    on_disk: bool = True  # False: memory tier only, `path` is in the scratch directory

    @property
    def rank(self) -> int:
        return self.adapter.max_rank

    @property
    def num_bytes(self) -> int:
        return self.adapter.num_bytes


def _dir_bytes(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.iterdir())


# Fields of composition.json that listings read, and their JSON types.
_INFO_FIELDS = {
    "model": str, "spec": str, "rank": int, "num_bytes": int, "merge_seconds": (int, float), "sources": list,
}


def info_problem(info, key: str) -> str | None:
    """What is wrong with a stored composition.json (None if nothing): any shape is possible."""
    if not isinstance(info, dict):
        return f"{INFO_NAME} is not an object"
    if info.get("key") != key:
        return f"{INFO_NAME} is for another key"
    created = info.get("created")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or created != created:
        return f"{INFO_NAME} has no valid creation time"
    for name, kind in _INFO_FIELDS.items():
        if name in info and (not isinstance(info[name], kind) or isinstance(info[name], bool)):
            return f"{INFO_NAME} has a {name} of the wrong type"
    return None


def _is_disk_error(exc: BaseException) -> bool:
    """A failure to write files (safetensors reports its I/O errors as SafetensorError)."""
    return isinstance(exc, (OSError, SafetensorError))


def _tmp_owner_alive(name: str) -> bool:
    """True if temp dir `name` (.tmp-<key>-<pid>-<random>) belongs to another live process on
    this host (a server sharing the cache dir, still writing)."""
    parts = name.split("-")
    if len(parts) != 4 or not parts[2].isdigit() or int(parts[2]) == os.getpid():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


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
        self._disk_ok = True
        self._scratch: Path | None = None
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._scan_disk()
        except OSError as exc:
            self._disk_failed("scan", exc)

    def set_hooks(self, on_admit: Hook | None, on_evict: Hook | None) -> None:
        """Called when an entry enters / leaves the memory tier (engine registration)."""
        self._on_admit = on_admit
        self._on_evict = on_evict

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

    def _discard_corrupt(self, key: str, path: Path, problem: str) -> None:
        logger.warning("discarding corrupt cache entry %s: %s", key[:12], problem)
        metrics.CACHE_CORRUPT_ENTRIES.inc()
        self._disk.pop(key, None)
        shutil.rmtree(path, ignore_errors=True)

    def _scan_disk(self) -> None:
        """Index the disk tier. Partial writes (temp dirs) of a crashed process are removed;
        entries whose description is corrupt or whose files are missing are discarded."""
        for entry in self.cache_dir.iterdir():
            if entry.name.startswith(_TMP_PREFIX):
                if not _tmp_owner_alive(entry.name):
                    shutil.rmtree(entry, ignore_errors=True)
            elif entry.is_dir() and _KEY_RE.fullmatch(entry.name):
                problem = self._entry_problem(entry)
                if problem is not None:
                    self._discard_corrupt(entry.name, entry, problem)
                else:
                    self._disk[entry.name] = (_dir_bytes(entry), entry.stat().st_mtime)

    def _entry_problem(self, path: Path) -> str | None:
        """A quick check of a disk entry (its files exist, its JSON files are sound); the weights
        are checked when the entry is loaded."""
        if not (path / WEIGHTS_NAME).is_file():
            return f"{WEIGHTS_NAME} is missing"
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
            info = json.loads((path / INFO_NAME).read_text())
        except (OSError, ValueError) as exc:
            return f"a JSON file cannot be read ({type(exc).__name__})"
        if not isinstance(config, dict):
            return f"{CONFIG_NAME} is not an object"
        return info_problem(info, path.name)

    def _read_disk(self, key: str) -> tuple[merging.LoraAdapter, dict] | None:
        """The cached adapter and info for `key`, or None. A corrupt entry is deleted."""
        path = self.cache_dir / key
        if not path.is_dir():
            return None
        try:
            info = json.loads((path / INFO_NAME).read_text())
            problem = info_problem(info, key)
            if problem is None:
                adapter = merging.load_adapter(path, name=key[:12])
        except Exception as exc:  # noqa: BLE001 - any failure to decode an entry makes it corrupt
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            self._discard_corrupt(key, path, problem)
            return None
        try:
            os.utime(path)  # LRU order of the disk tier
        except OSError as exc:
            self._disk_failed("touch", exc)
        return adapter, info

    def _write(self, key: str, build: BuildFn) -> tuple[merging.LoraAdapter, dict, Path, bool]:
        """Build `key` into the disk tier, or into memory only when the disk fails.
        Returns (adapter, info, path, on_disk)."""
        try:
            adapter, info = self._write_disk(key, build)
            self._disk_worked()
            return adapter, info, self.cache_dir / key, True
        except Exception as exc:
            if not _is_disk_error(exc):
                raise
            self._disk_failed("write", exc)
        path = self._scratch_dir() / key
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir()
        adapter, info = build(path)
        return adapter, {**info, "key": key, "created": time.time()}, path, False

    def _scratch_dir(self) -> Path:
        """This process's directory for memory-only entries (removed when the cache is)."""
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="loramix-memory-tier-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, True)
        return self._scratch

    def _write_disk(self, key: str, build: BuildFn) -> tuple[merging.LoraAdapter, dict]:
        """Build into a temp dir inside the cache dir, then rename it into place (atomic)."""
        tmp = self.cache_dir / f"{_TMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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

    async def _fill(self, key: str, build: BuildFn, run: RunFn) -> None:
        """Bring `key` into the memory tier: from disk if there, else by building it (with `run`)."""
        loaded = await asyncio.to_thread(self._read_disk, key)
        path, on_disk = self.cache_dir / key, True
        if loaded is not None:
            metrics.CACHE_HITS.labels(tier="disk").inc()
        else:
            self._disk.pop(key, None)
            metrics.CACHE_MISSES.inc()
            *loaded, path, on_disk = await run(self._write, key, build)
        adapter, info = loaded
        if on_disk:
            self._disk[key] = (await asyncio.to_thread(_dir_bytes, path), time.time())
        entry = CachedComposition(key=key, path=path, adapter=adapter, info=info, on_disk=on_disk)
        await self._admit(entry)
        await self._evict_disk(keep=key)

    async def acquire(self, key: str, build: BuildFn, run: RunFn = asyncio.to_thread) -> CachedComposition:
        """The entry for `key`, pinned (not evictable) until `release` is called.

        Concurrent callers for a missing key await one shared `_fill`; a caller that goes
        away does not cancel it (others may be waiting). The build runs through `run` (a
        merge pool's lane), the first caller's."""
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
                task = asyncio.create_task(self._fill(key, build, run))
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
        try:
            info = json.loads((self.cache_dir / key / INFO_NAME).read_text())
        except (OSError, ValueError):
            return None
        return info if info_problem(info, key) is None else None

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
            await self._drop_files(entry)
        found = entry is not None or key in self._disk
        self._disk.pop(key, None)
        await asyncio.to_thread(shutil.rmtree, self.cache_dir / key, True)
        return found

    async def clear_memory(self) -> None:
        """Drop the memory tier (engine shutdown)."""
        self._memory.clear()
