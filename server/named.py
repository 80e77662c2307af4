"""Named compositions: a name clients can use as `model`, stored next to the disk cache so it
survives restarts."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from server.composition import CompositionSpec

logger = logging.getLogger("loramix.named")

FILE_NAME = "named_compositions.json"


def spec_to_dict(spec: CompositionSpec) -> dict:
    return {
        "skills": [[name, weight] for name, weight in spec.skills],
        "method": spec.method,
        "options": dict(spec.options),
        "rank": spec.rank,
    }


def spec_from_dict(data: dict) -> CompositionSpec:
    return CompositionSpec(
        skills=tuple((str(name), float(weight)) for name, weight in data["skills"]),
        method=str(data["method"]),
        options=tuple(sorted(data.get("options", {}).items())),
        rank=data.get("rank"),
    )


class NamedCompositions:
    """name -> CompositionSpec, persisted as one JSON file (written atomically)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / FILE_NAME
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = self._read()

    def _read(self) -> dict[str, dict]:
        try:
            data = json.loads(self.path.read_text())
            for entry in data.values():
                spec_from_dict(entry["spec"])
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable named compositions file: %s", exc)
            return {}

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._entries, sort_keys=True, indent=1))
        os.replace(tmp, self.path)

    def get(self, name: str) -> CompositionSpec | None:
        with self._lock:
            entry = self._entries.get(name)
        return spec_from_dict(entry["spec"]) if entry is not None else None

    def created(self, name: str) -> float | None:
        with self._lock:
            entry = self._entries.get(name)
        return entry["created"] if entry is not None else None

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._entries)

    def put(self, name: str, spec: CompositionSpec) -> None:
        with self._lock:
            self._entries[name] = {"spec": spec_to_dict(spec), "created": time.time()}
            self._write()

    def delete(self, name: str) -> bool:
        with self._lock:
            if self._entries.pop(name, None) is None:
                return False
            self._write()
            return True
