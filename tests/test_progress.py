"""Progress lines of long stages (raydora.progress): formatting, rate limiting and the counter actor."""

from __future__ import annotations

import re

import pytest

from raydora.progress import Progress, duration, watch

LINE = re.compile(r"^\[(\w+)\] (.+): ([\d,]+)/([\d,]+) (\w+) \((\d+)%\)")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def parse(line: str) -> tuple[int, int]:
    m = LINE.match(line)
    assert m, line
    return int(m.group(3).replace(",", "")), int(m.group(4).replace(",", ""))


def test_durations() -> None:
    assert [duration(s) for s in (0, 44.6, 59.4, 185, 3599, 7620)] == ["0s", "45s", "59s", "3m05s", "59m59s", "2h07m"]


def test_rate_eta_and_when_lines_are_printed() -> None:
    clock, out = Clock(), []
    p = Progress("classify", "scoring", 1000, "rows", every_s=10, every_fraction=0.1, clock=clock, out=out.append)
    clock.now = 101
    assert p.update(50) is None  # first work seen: the rate counts from here; still in the first 10%
    clock.now = 102
    line = p.update(120)  # crossed 10%
    # (120 - 50) rows in 1 s; (1000 - 120) / 70 = 12.6 s left; 2 s since the Progress was made
    assert line == "[classify] scoring: 120/1,000 rows (12%), 70.0 rows/s, ETA 13s, 2s elapsed"
    clock.now = 103
    assert p.update(150) is None  # same 10% bucket, 1 s after the last line
    clock.now = 112.5
    assert p.update(160) == "[classify] scoring: 160/1,000 rows (16%), 9.6 rows/s, ETA 1m28s, 12s elapsed"  # 110 / 11.5
    clock.now = 125
    assert p.update(160) is None  # nothing new since the last line: no line, however long it has been
    assert p.update(100) is None and p.done == 160  # counts never go back
    clock.now = 126
    assert p.finish(1000) == "[classify] scoring: 1,000/1,000 rows (100%), 38.0 rows/s, 26s elapsed"  # 950 / 25, no ETA
    assert p.finish(1000) == out[-1] and len(out) == 3  # already said: not printed twice
    assert out == p.lines


def test_lines_are_bounded_by_fraction_and_interval() -> None:
    """10,000 updates over 100 s print about one line per 10% and per 10 s, not one per update."""
    clock, out = Clock(), []
    p = Progress("classify", "training", 10_000, "examples", clock=clock, out=out.append)
    for i in range(1, 10_001):
        clock.now += 0.01
        p.update(i)
    p.finish()
    assert 10 <= len(out) <= 10 + 100 // 10 + 1, out
    counts = [parse(line) for line in out]
    assert all(t == 10_000 for _, t in counts)
    done = [d for d, _ in counts]
    assert done == sorted(done) and done[-1] == 10_000
    assert "100.0 examples/s" in out[-1]  # one example per 0.01 s


def test_unknown_total_prints_counts_without_eta() -> None:
    clock, out = Clock(), []
    p = Progress("score", "rows", None, every_s=5, clock=clock, out=out.append)
    clock.now += 1
    p.update(10)
    clock.now += 6
    assert p.update(40) == "[score] rows: 40 rows, 5.0 rows/s, 7s elapsed"


def test_watch_counts_what_ray_tasks_add(ray_session) -> None:
    """The counter actor sums what remote tasks send it; the driver's thread turns that into lines while the block
    runs, and the block's end reads the last count."""
    import time

    ray = ray_session
    out: list[str] = []
    p = Progress("classify", "work", 60, "items", every_s=0.2, out=out.append)

    @ray.remote(num_cpus=0)
    def work(counter, n: int) -> int:
        for _ in range(n):
            counter.add.remote(1)
        return n

    with watch(p, poll_s=0.05) as counter:
        assert ray.get(work.remote(counter, 25)) == 25
        deadline = time.monotonic() + 30
        while p.done < 25 and time.monotonic() < deadline:  # the task's calls reach the actor after it returns
            time.sleep(0.05)
        assert p.done == 25 and out and parse(out[-1]) == (25, 60), out  # seen by the thread, inside the block
        assert sum(ray.get([work.remote(counter, 5) for _ in range(7)])) == 35
    line = p.finish(60)
    assert parse(line) == (60, 60) and "(100%)" in line
    done = [parse(x)[0] for x in out]
    assert done == sorted(done), out
    # The actor is gone with the block. ray.kill is asynchronous: a call racing it may still be served (CI saw
    # one), so call until the actor is reported dead, for 30 s at most.
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(counter.get.remote(), timeout=30)
            time.sleep(0.1)
