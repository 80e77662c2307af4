"""The disk tier of the composition cache: one directory of PEFT entries (one sub-directory per
composition key) that several replicas may share, on one host or on a shared volume.

Rules that make sharing safe (docs/server.md, "Sharing the cache directory"):
- An entry is built in a temp dir and renamed into place. Keys are content-addressed, so when
  the final directory already holds a complete entry (another replica won the race) the writer
  adopts it and discards its own; a complete entry is never replaced.
- Every use touches the entry's mtime. Eviction counts every entry in the directory (not only
  the ones this replica wrote) and deletes only entries untouched for `grace_s` seconds, by
  renaming them away first, so a reader never sees half an entry.
- A temp dir is stale, and removed, when its writer is gone: on this host, its process is
  dead (or, for this process's pid, it is not one this process is writing now); on other
  hosts, its heartbeat (the writer touches it while building) is older than `grace_s`.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable

import merging
from merging.adapter import CONFIG_NAME, WEIGHTS_NAME

from server import metrics
from server.composition_info import CompositionInfo, CorruptInfo

logger = logging.getLogger("loramix.cache")

INFO_NAME = "composition.json"
KEY_RE = re.compile(r"[0-9a-f]{64}")
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".del-"
# Short, dash-free id of this host: temp dir names say which host's process writes them.
HOST_ID = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]

# build(out_dir) merges, saves the adapter into out_dir and returns (adapter, info).
DirBuildFn = Callable[[Path], "tuple[merging.LoraAdapter, CompositionInfo]"]
# on_error(operation, exc): a disk failure the tier absorbed (counted and logged by the cache).
ErrorFn = Callable[[str, BaseException], None]

def entry_problem(path: Path) -> str | None:
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
    try:
        CompositionInfo.from_json(info, path.name)
    except CorruptInfo as exc:
        return str(exc)
    return None


def dir_bytes(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.iterdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


# Temp dirs this process is writing now. A temp dir with this process's pid that is not here
# was left by an earlier process that had the same pid (a restarted container's pid 1).
_LIVE_TMPS: set[str] = set()


def tmp_is_stale(entry: Path, grace_s: float, now: float) -> bool:
    """Whether temp dir `entry` (.tmp-<key16>-<host>-<pid>-<random>) was left by a writer that
    is gone. A pid only means something on its own host; elsewhere the heartbeat decides."""
    parts = entry.name[len(TMP_PREFIX):].split("-")
    if len(parts) == 4 and parts[1] == HOST_ID and parts[2].isdigit():
        if int(parts[2]) == os.getpid():
            return entry.name not in _LIVE_TMPS
        return not _pid_alive(int(parts[2]))
    try:
        return now - entry.stat().st_mtime > grace_s
    except FileNotFoundError:
        return False


class DiskTier:
    """The entries of one cache directory: index, read, write, touch, evict, remove."""

    def __init__(self, cache_dir: Path, *, grace_s: float, on_error: ErrorFn) -> None:
        self.cache_dir = Path(cache_dir)
        self.grace_s = grace_s
        self._on_error = on_error
        self.index: dict[str, tuple[int, float]] = {}  # key -> (bytes, mtime), every replica's

    @property
    def touch_interval_s(self) -> float:
        """How often a used entry (or a temp dir being written) is touched: well inside the grace."""
        return max(self.grace_s / 4, 0.5)

    def path(self, key: str) -> Path:
        return self.cache_dir / key

    def new_tmp(self, key: str) -> Path:
        return self.cache_dir / f"{TMP_PREFIX}{key[:16]}-{HOST_ID}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ index

    def scan(self) -> None:
        """Index the directory at start: corrupt entries are discarded, stale temp dirs removed."""
        self.index.clear()
        for entry in self.cache_dir.iterdir():
            if KEY_RE.fullmatch(entry.name) and entry.is_dir():
                problem = entry_problem(entry)
                if problem is not None:
                    self.discard_corrupt(entry.name, problem)
                    continue
            self._index_one(entry, time.time())

    def refresh(self) -> None:
        """Re-index the directory (entries other replicas wrote or deleted); sweep leftovers.
        New entries are not checked here: they were renamed into place complete, and every
        entry is checked when loaded."""
        now, seen = time.time(), set()
        for entry in self.cache_dir.iterdir():
            if self._index_one(entry, now):
                seen.add(entry.name)
        for key in set(self.index) - seen:
            del self.index[key]

    def _index_one(self, entry: Path, now: float) -> bool:
        """Index a key directory (True) or sweep a stale temp dir / a leftover of a deletion."""
        name = entry.name
        try:
            if KEY_RE.fullmatch(name) and entry.is_dir():
                mtime = entry.stat().st_mtime
                size = self.index[name][0] if name in self.index else dir_bytes(entry)
                self.index[name] = (size, mtime)
                return True
            if (name.startswith(TMP_PREFIX) and tmp_is_stale(entry, self.grace_s, now)) or (
                name.startswith(TRASH_PREFIX) and now - entry.stat().st_mtime > self.grace_s
            ):
                shutil.rmtree(entry, ignore_errors=True)
        except FileNotFoundError:
            pass  # deleted by another replica meanwhile
        return False

    # ------------------------------------------------------------------ entries

    def read(self, key: str) -> tuple[merging.LoraAdapter, CompositionInfo] | None:
        """The adapter and info of `key`, or None. A corrupt entry is discarded; an entry that
        vanished while being read (another replica evicted it) is just a miss."""
        path = self.path(key)
        if not path.is_dir():
            return None
        problem = None
        try:
            info = CompositionInfo.from_json(json.loads((path / INFO_NAME).read_text()), key)
            adapter = merging.load_adapter(path, name=key[:12])
        except CorruptInfo as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure to decode an entry makes it corrupt
            problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            if path.is_dir():
                self.discard_corrupt(key, problem)
            else:
                self.index.pop(key, None)
            return None
        self.touch(key)
        self._index_one(path, time.time())
        return adapter, info

    def write(self, key: str, build: DirBuildFn, tmp: Path) -> tuple[merging.LoraAdapter, CompositionInfo]:
        """Build `key` into `tmp` and rename it into place. If another writer got there first
        with a complete entry, adopt theirs (same content: the key is content-addressed)."""
        _LIVE_TMPS.add(tmp.name)
        try:
            tmp.mkdir()
            adapter, info = build(tmp)
            info = dataclasses.replace(info, key=key, created=time.time())
            (tmp / INFO_NAME).write_text(json.dumps(info.to_json(), sort_keys=True))
            existing = self._publish(key, tmp)
            self._index_one(self.path(key), time.time())
            return existing or (adapter, info)
        finally:
            _LIVE_TMPS.discard(tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, key: str, adapter: merging.LoraAdapter, info: CompositionInfo) -> None:
        """Write an entry this replica still holds in memory back to disk (another replica
        evicted it while it was unused for the grace period)."""
        tmp = self.new_tmp(key)
        _LIVE_TMPS.add(tmp.name)
        try:
            tmp.mkdir()
            adapter.save(tmp)
            (tmp / INFO_NAME).write_text(json.dumps(info.to_json(), sort_keys=True))
            self._publish(key, tmp)
        finally:
            _LIVE_TMPS.discard(tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, key: str, tmp: Path) -> tuple[merging.LoraAdapter, CompositionInfo] | None:
        """Rename `tmp` to the entry of `key` (None), or return the complete entry already there."""
        for _ in range(3):
            try:
                os.rename(tmp, self.path(key))
                return None
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            existing = self.read(key)  # a corrupt one is discarded, and the rename retried
            if existing is not None:
                return existing
        raise OSError(errno.EEXIST, f"cannot publish cache entry {key[:12]}")

    def touch(self, key: str) -> bool:
        """Mark `key` used now (its mtime), so no replica evicts it within the grace period.
        False if the entry is gone."""
        try:
            os.utime(self.path(key))
        except FileNotFoundError:
            self.index.pop(key, None)
            return False
        except OSError as exc:
            self._on_error("touch", exc)
            return True
        if key in self.index:
            self.index[key] = (self.index[key][0], time.time())
        return True

    def remove(self, key: str) -> bool:
        """Delete the entry of `key`: renamed away first (atomic), so no reader sees half an
        entry, then deleted. False if it was not there."""
        self.index.pop(key, None)
        trash = self.cache_dir / f"{TRASH_PREFIX}{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path(key), trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def discard_corrupt(self, key: str, problem: str) -> None:
        logger.warning("discarding corrupt cache entry %s: %s", key[:12], problem)
        metrics.CACHE_CORRUPT_ENTRIES.inc()
        self.remove(key)

    # ------------------------------------------------------------------ eviction

    def evict(self, protected: set[str], max_bytes: int) -> list[str]:
        """Delete least recently used entries until the directory fits `max_bytes`, sparing
        `protected` keys and every entry used within the grace period (by any replica).
        Returns the keys deleted."""
        self.refresh()
        total = sum(size for size, _ in self.index.values())
        cutoff = time.time() - self.grace_s
        evicted = []
        for key, (size, mtime) in sorted(self.index.items(), key=lambda item: item[1][1]):
            if total <= max_bytes or mtime > cutoff:
                break
            if key in protected:
                continue
            if self.remove(key):
                evicted.append(key)
            total -= size
        return evicted
