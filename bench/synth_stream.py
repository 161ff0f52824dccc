"""Does the synthetic benchmark stream? Peak memory (driver + Ray workers) and throughput of `write_benchmark`
for N and 10*N rows, each in a fresh process with a fresh local Ray. Target: 10x the rows < 1.5x the peak memory.

    .venv/bin/python -m bench.synth_stream --rows 100000        # then 1,000,000 in the same run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PeakRSS, record


def one(rows: int) -> dict[str, float]:
    import ray

    from raydora import synth

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        start = time.perf_counter()
        synth.write_benchmark(Path(tmp) / "b", rows=rows, seed=0, eval_rows=1000)
        seconds = time.perf_counter() - start
    ray.shutdown()
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds, "peak_rss_mb": mem.peak / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="N; the run also measures 10*N")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child)))
        return
    runs = []
    for rows in (args.rows, 10 * args.rows):
        out = subprocess.run(
            [sys.executable, "-m", "bench.synth_stream", "--child", str(rows)], capture_output=True, text=True
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    ratio = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    result = {"runs": runs, "memory_ratio_10x_rows": ratio, "target": "< 1.5", "met": ratio < 1.5}
    print(f"10x rows -> {ratio:.2f}x peak memory (target < 1.5): {'met' if ratio < 1.5 else 'NOT met'}")
    print(f"written to {record('synth_stream', result)}")


if __name__ == "__main__":
    main()
