"""The run directory's contract: atomic stage outputs, ``_SUCCESS`` markers and input fingerprints.

A stage writes into a hidden temp folder beside its output and renames it into place when it is complete; its
``_SUCCESS`` marker (JSON: row counts, input and config fingerprint, and a manifest of the folder's files) is the
commit point. A rerun whose fingerprint matches the marker, and whose files still match the manifest, skips the
stage; anything without a marker, or with a file missing or changed since the marker was written, is redone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
# Files below this size also get a content hash in the manifest: small files (JSON/YAML settings, calibration,
# tokenizer and model configs) are where an edit that keeps the size is plausible, and hashing them costs about as
# much as the stat. Larger files (parquet shards, weights) are checked by size only: a truncated or half-written
# file changes size (and a truncated parquet file loses its footer), and hashing gigabytes on every rerun would
# cost more than the checks are worth.
HASH_BELOW = 1 << 20


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
    """(name, size, mtime_ns) of every file under ``path``: cheap to compute for inputs larger than memory.

    Names are relative to ``path`` (a file: its own name), so a run directory that is moved, or whose finished
    stage folders are symlinked into another run (``raydora.experiment.link_shared`` shares one SFT model and its
    samples across methods), still matches its markers; any edit to a file changes its size or mtime."""
    p = Path(path)
    if p.is_file():
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns)]
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    return [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]


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


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()[:16]


def manifest(folder: str | Path, exclude: Iterable[str] = ()) -> tuple[dict[str, int], dict[str, str]]:
    """``({path: size}, {path: sha256[:16]})`` of every file under ``folder``, paths relative and POSIX, leaving out
    the marker, hidden files and folders (temp files: their names start with "."), and the ``exclude`` paths
    (relative files or folders, e.g. ``checkpoints``: whatever is managed by others or may change after the marker).
    Only files under :data:`HASH_BELOW` bytes are hashed; the rest is a stat."""
    root = Path(folder)
    skip = {e.strip("/") for e in exclude}
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and (rel_dir / d).as_posix() not in skip)
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if name.startswith(".") or rel == SUCCESS or rel in skip:
                continue
            path = Path(dirpath) / name
            size = path.stat().st_size
            sizes[rel] = size
            if size < HASH_BELOW:
                digests[rel] = _digest(path)
    return sizes, digests


def manifest_problems(folder: str | Path, marker: dict[str, Any]) -> list[str]:
    """What no longer matches the marker's manifest (``<folder>/<path> is missing``, ``... changed size (a -> b)``,
    ``... changed content``); empty when all matches, or when the marker predates manifests (fingerprint only)."""
    folder = Path(folder)
    sizes, digests = marker.get("manifest"), marker.get("digests") or {}
    if sizes is None:
        return []
    if not isinstance(sizes, dict) or not isinstance(digests, dict):
        return [f"{folder.name}/{SUCCESS} has an unreadable manifest"]
    problems = []
    for rel, size in sizes.items():
        path = folder / rel
        shown = f"{folder.name}/{rel}"
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{shown} is missing")
            continue
        if not path.is_file():
            problems.append(f"{shown} is missing (not a file)")
        elif st.st_size != size:
            problems.append(f"{shown} changed size ({size} -> {st.st_size})")
        elif rel in digests and _digest(path) != digests[rel]:
            problems.append(f"{shown} changed content (same size, different hash)")
    return problems


def is_done(folder: str | Path, fp: str, on_corrupt: Callable[[Path], object] | None = None) -> bool:
    """True when ``folder`` holds a marker written for the same fingerprint, and every file of the marker's manifest
    is still there with its recorded size (and hash, for small files). When the fingerprint matches but a file is
    missing or changed, prints which one, calls ``on_corrupt(folder)`` if given (e.g. to discard state that a redo
    would otherwise resume from) and returns False. Markers without a manifest (written before manifests existed)
    are checked by fingerprint only."""
    marker = read_success(folder)
    if marker is None or marker.get("fingerprint") != fp:
        return False
    problems = manifest_problems(folder, marker)
    if not problems:
        return True
    more = f"; {len(problems) - 1} more file(s) differ" if len(problems) > 1 else ""
    print(f"[{marker.get('stage', 'rundir')}] {problems[0]}{more}: redoing", flush=True)
    if on_corrupt is not None:
        on_corrupt(Path(folder))
    return False


def write_success(folder: str | Path, info: dict[str, Any], exclude: Iterable[str] = ()) -> Path:
    """Write the marker atomically (temp file, then rename), with the :func:`manifest` of ``folder``'s files: write
    it once the folder is complete. ``exclude``: relative paths whose files may change after the marker (they are
    left out of the manifest, so changes there never make the stage look corrupted). The manifest's paths are
    relative, so it stays valid when the folder is renamed into place (:func:`promote`) or the run moved."""
    folder = Path(folder)
    sizes, digests = manifest(folder, exclude)
    info = {**info, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "manifest": sizes, "digests": digests}
    tmp = folder / f".{SUCCESS}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, folder / SUCCESS)
    return folder / SUCCESS


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_pid(folder: Path) -> int | None:
    """The id of the process on this host that made :func:`fresh_staging`'s ``folder``; None for another host's or a
    name not of that form."""
    parts = folder.name.rsplit("-", 3)  # .<name>.tmp, <random>, <pid>, <host tag>
    if len(parts) != 4 or parts[3] != _host_tag() or not parts[2].isdigit():
        return None
    return int(parts[2])


def stale_staging(parent: str | Path, name: str) -> list[Path]:
    """The temp folders of :func:`staging` for ``name`` in ``parent`` whose process is gone: left by a process
    killed before it could clean up (``SIGKILL``, an OOM kill, a lost node). Only folders made on this host, by a
    process id that no longer exists, qualify; another host's, a live process's (a concurrent run) and unnamed
    ones are never touched."""
    stale = []
    for tmp in Path(parent).glob(f".{name}.tmp-*"):
        pid = staging_pid(tmp)
        if pid is None or not tmp.is_dir():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(tmp)
        except OSError:  # exists, another user's: alive
            continue
    return stale


def fresh_staging(parent: str | Path, name: str) -> Path:
    """A new folder ``parent/.<name>.tmp-<random>-<pid>-<host>`` (absolute). Folders of that name that an earlier
    process killed mid-write left behind (:func:`stale_staging`) are removed first, saying so."""
    parent = Path(parent).absolute()  # absolute: Ray workers (Train especially) run in other folders
    parent.mkdir(parents=True, exist_ok=True)
    for old in stale_staging(parent, name):
        print(f"[rundir] removing {old}: left by a process that was killed mid-stage", flush=True)
        shutil.rmtree(old, ignore_errors=True)
    tmp = parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}-{_host_tag()}"
    tmp.mkdir()
    return tmp


@contextmanager
def staging(parent: str | Path, name: str) -> Iterator[Path]:
    """A fresh temp folder inside ``parent`` for a stage's outputs (:func:`fresh_staging`: its name holds this
    process's id and host, and stale ones go first); removed on error. Promote its contents with :func:`promote`
    once complete."""
    tmp = fresh_staging(parent, name)
    try:
        yield tmp
    except Exception as e:
        if isinstance(e, DiskFullError) or not out_of_space(e):
            raise
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device while writing {name!r} under {tmp.parent} (staged in {tmp.name}, now removed: "
            f"nothing was promoted, no {SUCCESS} written); free space on that filesystem and rerun",
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class DiskFullError(OSError):
    """A stage ran out of space (``ENOSPC``) while writing its output: :func:`staging` says which and where."""


def out_of_space(e: BaseException) -> bool:
    """Whether ``e`` or an exception it was raised from is ``ENOSPC``, also when a Ray task or pyarrow reports it
    as text (``[Errno 28]``, ``No space left on device``)."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(x) or f"[Errno {errno.ENOSPC}]" in str(x):
            return True
        x = x.__cause__ or x.__context__
    return False


def promote(tmp_child: Path, final: Path) -> None:
    """Replace ``final`` by ``tmp_child`` (same file system: a rename)."""
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_child, final)
