"""Progress lines for long stages, printed the way training prints its steps:

    [classify] scoring: 1,200/5,000 rows (24%), 35.2 rows/s, ETA 1m48s

:class:`Progress` formats and rate-limits them (a line every ``every_s`` seconds or each ``every_fraction`` of
the total, whichever comes first, so a stage prints at most ``1 / every_fraction`` lines plus one per interval).
Work done inside Ray tasks, actors or Train workers is counted by a :class:`Counter` actor: the workers send it
``add(n)`` (fire and forget), and :func:`watch` polls it from the driver in a background thread. Counting never
touches the data, so it cannot change a stage's results.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``done`` out of ``total`` ``unit``s of ``what``, printed as ``[stage] what: done/total unit (pct), rate, ETA``.

    The rate (and the ETA from it) counts from the first update that sees work done, so start-up time (workers
    starting, models loading) does not drag it down. ``clock`` and ``out`` are injectable for tests."""

    def __init__(
        self,
        stage: str,
        what: str,
        total: int | None,
        unit: str = "rows",
        *,
        every_s: float = 10.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[str], None] | None = None,
    ) -> None:
        self.stage, self.what, self.total, self.unit = stage, what, total, unit
        self.every_s, self.every_fraction = every_s, every_fraction
        self.clock = clock
        self.out = out or (lambda line: print(line, flush=True))
        self.done = 0
        self.started = clock()
        self._first: tuple[float, int] | None = None  # (time, done) of the first update that saw work
        self._printed_at, self._printed_done = self.started, 0
        self.lines: list[str] = []

    def _bucket(self, done: int) -> int:
        if not self.total:
            return 0
        return math.floor(min(done, self.total) / self.total / self.every_fraction + 1e-9)

    def rate(self, now: float | None = None) -> float | None:
        """Units per second since the first update that saw work (None before two distinct observations)."""
        now = self.clock() if now is None else now
        if self._first is None or now <= self._first[0] or self.done <= self._first[1]:
            return None
        return (self.done - self._first[1]) / (now - self._first[0])

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        parts = [f"[{self.stage}] {self.what}: "]
        if self.total:
            done = min(self.done, self.total)
            parts.append(f"{done:,}/{self.total:,} {self.unit} ({100 * done / self.total:.0f}%)")
        else:
            parts.append(f"{self.done:,} {self.unit}")
        rate = self.rate(now)
        if rate is not None:
            parts.append(f", {rate:,.1f} {self.unit}/s")
            if self.total and self.done < self.total:
                parts.append(f", ETA {duration((self.total - self.done) / rate)}")
        parts.append(f", {duration(now - self.started)} elapsed")
        return "".join(parts)

    def update(self, done: int) -> str | None:
        """Set the count to ``done``; print (and return) a line when one is due."""
        now = self.clock()
        if done > 0 and self._first is None:
            self._first = (now, done)
        before, self.done = self.done, max(self.done, done)
        due = self.done > self._printed_done and (
            now - self._printed_at >= self.every_s or self._bucket(self.done) > self._bucket(before)
        )
        if not due:
            return None
        return self._emit(now)

    def advance(self, n: int) -> str | None:
        return self.update(self.done + n)

    def finish(self, done: int | None = None) -> str:
        """The last line: ``done`` is the final count where the caller knows it exactly. Printed unless the last
        line printed already showed that count."""
        if done is not None:
            self.done = max(self.done, done)
        if self.lines and self._printed_done == self.done:
            return self.lines[-1]
        return self._emit(self.clock())

    def _emit(self, now: float) -> str:
        text = self.line(now)
        self._printed_at, self._printed_done = now, self.done
        self.lines.append(text)
        self.out(text)
        return text


class _Counter:
    """Ray actor body: running totals that workers add to and the driver reads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, n: int, key: str = "") -> None:
        self.counts[key] = self.counts.get(key, 0) + int(n)

    def get(self) -> dict[str, int]:
        return dict(self.counts)


def counter() -> Any:
    """A :class:`_Counter` actor that takes no CPU (Train workers and actor pools hold the cores)."""
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(_Counter).remote()


@contextmanager
def watch(progress: Progress, poll_s: float = 1.0) -> Iterator[Any]:
    """Yield a counter actor for the workers to ``add.remote(n)`` to; until the block ends, a daemon thread reads
    its total every ``poll_s`` seconds into ``progress``. The actor is killed at the end; a failure to read it
    (a dead actor) stops the polling, never the stage. The caller prints the last line (``progress.finish``)."""
    import ray

    handle = counter()
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(poll_s):
            try:
                progress.update(sum(ray.get(handle.get.remote(), timeout=30).values()))
            except Exception:  # noqa: BLE001 - progress is best effort
                return

    thread = threading.Thread(target=poll, name=f"progress-{progress.stage}", daemon=True)
    thread.start()
    try:
        yield handle
    finally:
        stop.set()
        thread.join(timeout=5)
        for last in (
            lambda: progress.update(sum(ray.get(handle.get.remote(), timeout=10).values())),
            lambda: ray.kill(handle),
        ):
            try:
                last()
            except Exception:  # noqa: BLE001 - a dead actor, or Ray shut down by the failure that ended the block
                pass
