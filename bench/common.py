"""Shared benchmark helpers: peak memory of a process tree (driver + local Ray workers), sampled in a thread."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil


def _process_kind(p: psutil.Process) -> str:
    """A short name for a process of a Ray tree: its Ray title (``ray::RayTrainWorker``), or its program."""
    try:
        title = p.name()
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if title.startswith("ray::"):
        return title
    for arg in cmd[:3]:
        if arg.endswith(".py") or "/ray/" in arg:
            return Path(arg).name
    return title


class PeakRSS:
    """Samples the summed RSS of a process (default: this one) and all its descendants (raylet, Ray workers) every
    ``interval`` seconds; ``peak`` is the largest sum seen. Shared pages count once per process: use it for ratios.
    With ``pss=True`` it also sums PSS (shared pages divided among the processes sharing them: the tree's real
    footprint) into ``peak_pss``; reading it costs more per sample."""

    def __init__(self, interval: float = 0.1, pid: int | None = None, pss: bool = False) -> None:
        self.interval, self.pid, self.pss = interval, pid or os.getpid(), pss
        self.peak = self.peak_pss = self.peak_processes = 0
        self.peak_parts: list[tuple[str, int]] = []  # (process kind, PSS) at the PSS peak
        self.peak_at = 0.0  # when the PSS peak was seen (time.time())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        rss = pss = 0
        seen: list[tuple[psutil.Process, int]] = []
        for p in procs:
            try:
                m = p.memory_full_info() if self.pss else p.memory_info()
            except psutil.Error:
                continue
            rss, pss = rss + m.rss, pss + getattr(m, "pss", m.rss)
            seen.append((p, getattr(m, "pss", m.rss)))
        if self.pss and pss > self.peak_pss:  # label the processes only at a new peak
            self.peak_pss, self.peak_at = pss, time.time()
            self.peak_parts = [(_process_kind(p), b) for p, b in seen]
        self.peak_processes = max(self.peak_processes, len(procs))
        return rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def record(name: str, result: dict[str, Any], out_dir: str | Path = "bench/results") -> Path:
    """Write ``result`` to ``bench/results/<name>.json`` (with the machine it ran on) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
