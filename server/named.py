"""Named compositions: a name clients can use as `model`, stored next to the disk cache so it
survives restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path

from server import metrics
from server.composition import CompositionSpec

logger = logging.getLogger("loramix.named")

FILE_NAME = "named_compositions.json"


def spec_to_dict(spec: CompositionSpec) -> dict:
    return {
        "skills": [[name, weight] for name, weight in spec.skills],
        "method": spec.method,
        "options": dict(spec.options),
        "rank": spec.rank,
        "module_weights": {module: list(row) for module, row in spec.module_weights},
    }


def spec_from_dict(data: dict) -> CompositionSpec:
    return CompositionSpec(
        skills=tuple((str(name), float(weight)) for name, weight in data["skills"]),
        method=str(data["method"]),
        options=tuple(sorted(data.get("options", {}).items())),
        rank=data.get("rank"),
        module_weights=tuple(
            (str(module), tuple(float(w) for w in row)) for module, row in sorted(data.get("module_weights", {}).items())
        ),
    )


class NamedCompositions:
    """name -> CompositionSpec, persisted as one JSON file (written atomically).

    The file is re-read when it changes on disk, so names saved by another process (e.g.
    `loramix tune-cat` while the server runs) are served without a restart.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self._lock = threading.Lock()
        self._write_failed = False
        self._stamp = self._file_stamp()
        self._entries: dict[str, dict] = self._read()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        """Re-read the file if another writer changed it (call with the lock held)."""
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._stamp = stamp
            self._entries = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable named compositions file: %s", type(exc).__name__)
            return {}
        if not isinstance(data, dict):
            logger.warning("ignoring named compositions file that is not an object")
            return {}
        entries = {}
        for name, entry in data.items():
            try:
                spec_from_dict(entry["spec"])
                created = entry["created"]
                if not isinstance(created, (int, float)) or isinstance(created, bool):
                    raise TypeError("created is not a number")
            except Exception as exc:  # noqa: BLE001 - any shape is possible in a hand-edited file
                logger.warning("ignoring unreadable named composition %r: %s", name, type(exc).__name__)
                continue
            entries[name] = entry
        return entries

    def _write(self) -> None:
        """Persist the names; when the directory cannot be written they stay in memory only
        (until the server stops), logged once and counted."""
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self._entries, sort_keys=True, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            metrics.CACHE_DISK_ERRORS.labels(operation="named").inc()
            if not self._write_failed:
                logger.warning("named compositions cannot be saved (%s); they are kept in memory only",
                               type(exc).__name__)
            self._write_failed = True
            return
        self._write_failed = False
        self._stamp = self._file_stamp()

    def get(self, name: str) -> CompositionSpec | None:
        with self._lock:
            self._refresh()
            entry = self._entries.get(name)
        return spec_from_dict(entry["spec"]) if entry is not None else None

    def created(self, name: str) -> float | None:
        with self._lock:
            self._refresh()
            entry = self._entries.get(name)
        return entry["created"] if entry is not None else None

    def names(self) -> list[str]:
        with self._lock:
            self._refresh()
            return sorted(self._entries)

    def put(self, name: str, spec: CompositionSpec) -> None:
        with self._lock:
            self._refresh()
            self._entries[name] = {"spec": spec_to_dict(spec), "created": time.time()}
            self._write()

    def delete(self, name: str) -> bool:
        with self._lock:
            self._refresh()
            if self._entries.pop(name, None) is None:
                return False
            self._write()
            return True
