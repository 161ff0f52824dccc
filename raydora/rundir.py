"""The run directory's contract: atomic stage outputs, ``_SUCCESS`` markers and input fingerprints.

A stage writes into a hidden temp folder beside its output and renames it into place when it is complete; its
``_SUCCESS`` marker (JSON: row counts, input and config fingerprint) is the commit point. A rerun whose
fingerprint matches the marker skips the stage; anything without a marker is redone from scratch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"


@dataclass
class StageResult:
    """What a stage did: its output folders, row counts, and whether it was skipped as already done."""

    stage: str
    outputs: dict[str, str]
    counts: dict[str, int]
    skipped: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"[{self.stage}] {'skipped (up to date)' if self.skipped else 'done'}: {counts}"


def file_fingerprints(path: str | Path) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file under ``path``: cheap to compute for inputs larger than memory."""
    p = Path(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def fingerprint(*parts: Any) -> str:
    """A short hash of JSON-serialisable parts (input fingerprints, config sections)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_success(folder: str | Path) -> dict[str, Any] | None:
    marker = Path(folder) / SUCCESS
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_done(folder: str | Path, fp: str) -> bool:
    """True when ``folder`` holds a marker written for the same fingerprint."""
    marker = read_success(folder)
    return marker is not None and marker.get("fingerprint") == fp


def write_success(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write the marker atomically (temp file, then rename)."""
    folder = Path(folder)
    tmp = folder / f".{SUCCESS}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2) + "\n")
    os.replace(tmp, folder / SUCCESS)
    return folder / SUCCESS


@contextmanager
def staging(parent: str | Path, name: str) -> Iterator[Path]:
    """A fresh temp folder inside ``parent`` for a stage's outputs; removed on error. Promote its contents with
    :func:`promote` once complete."""
    parent = Path(parent).absolute()  # absolute: Ray workers (Train especially) run in other folders
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def promote(tmp_child: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp_child`` (same file system: a rename)."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_child, final)
