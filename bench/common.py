"""Shared benchmark helpers: peak memory of a process tree (driver + local Ray workers), sampled in a thread."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants (raylet, Ray workers) every ``interval``
    seconds; ``peak`` is the largest sum seen. Shared pages count once per process: use it for ratios."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = psutil.Process(os.getpid())
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

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
