"""End-to-end demo: wall time and peak memory of ``raydora pipeline`` on the demo config, from an empty run
directory, with every stage's seconds (issue 8's targets: at most 5 minutes and 6 GB on this 2-core machine).

Memory is the peak, over samples every half second, of the summed memory of the whole process tree: the driver,
the raylet, GCS, dashboard and every Ray worker (Ray Train workers, Ray Data actors and tasks). Two sums are
recorded: RSS (counts pages shared between processes once per process: an upper bound) and PSS (shares them out:
the tree's real footprint). Ray's object store lives in /dev/shm and is counted through the processes mapping it.

    .venv/bin/python -m bench.demo_run                      # about 5 minutes; bench/results/demo_run.json
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PeakRSS, record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="jobs/configs/demo_cpu.yaml")
    ap.add_argument("--name", default="demo_bench", help="run name (its folder under runs/ is deleted first)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    run_dir = Path("runs") / args.name
    shutil.rmtree(run_dir, ignore_errors=True)
    raydora = str(Path(sys.executable).parent / "raydora")
    cmd = [raydora, "pipeline", "--config", args.config, f"name={args.name}", *args.overrides]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    lines: list[str] = []
    ends: list[tuple[float, str]] = []  # (when, stage) of each stage's summary line
    with PeakRSS(interval=0.5, pid=proc.pid, pss=True) as mem:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("["):
                ends.append((time.time(), line.split("]")[0][1:]))
            if line.startswith("[") or "win rate" in line:
                print(line, end="", flush=True)
        rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        sys.exit(f"the pipeline failed ({rc}):\n{''.join(lines[-40:])}")
    stages: dict[str, Any] = {}
    for line in lines:
        m = re.match(r"\[(\w+)\] (done|skipped).*\(([\d.]+) s\)\s*$", line)
        if m:
            stages[m.group(1)] = float(m.group(3))
    gb = 1e9
    result = {"command": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_sum_gb": round(mem.peak / gb, 2),
              "peak_pss_sum_gb": round(mem.peak_pss / gb, 2), "peak_processes": mem.peak_processes,
              "stage_seconds": stages, "targets": {"wall_s": 300, "peak_gb": 6}}  # fmt: skip
    result["peak_pss_during_stage"] = next((st for t, st in ends if t >= mem.peak_at), "?")
    kinds: dict[str, list[int]] = {}
    for kind, b in mem.peak_parts:
        kinds.setdefault(kind, []).append(b)
    result["peak_pss_by_process_kind_mb"] = {
        f"{k} x{len(v)}": round(sum(v) / 1e6) for k, v in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))
    }
    print(f"PSS peak during the {result['peak_pss_during_stage']} stage, by process kind:")
    for k, mb in result["peak_pss_by_process_kind_mb"].items():
        print(f"  {mb:6d} MB  {k}")
    print(f"wall {wall:.0f} s, peak memory of the process tree: PSS {mem.peak_pss / gb:.2f} GB, RSS "
          f"{mem.peak / gb:.2f} GB ({mem.peak_processes} processes at most)")  # fmt: skip
    print(f"written: {record('demo_run', result)}")


if __name__ == "__main__":
    main()
