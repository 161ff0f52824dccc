"""Classifier scoring on a Ray Data actor pool: throughput with 1 vs 2 actors, and peak memory at N vs 10*N
rows. Targets (ratios in one run, 2-core CPU): 2 actors >= 1.8x 1 actor; 10x rows < 1.5x peak memory.

Throughput uses the real backbone (the pretrained MiniLM when installed) with an untrained head: weights do not
change the cost. Each actor runs one torch thread, so 2 actors use both cores.

    .venv/bin/python -m bench.score_scaling --rows 1000 --memory-rows 2000
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

SOURCES = ("verbose", "sloppy")


def prepare(root: Path, rows: int, backbone: str | None) -> None:
    """Benchmark data, validated, plus (unless ``backbone`` is None) one classifier folder per source (untrained
    head, T = gamma = 1)."""
    from raydora import synth, validate
    from raydora.classifier import resolve_backbone
    from raydora.models import build_model, load_encoder, load_tokenizer, save_pretrained, train_tokenizer
    from raydora.rundir import write_success

    synth.write_benchmark(root / "synth", rows=rows, seed=0, eval_rows=10)
    result = validate.validate(root / "synth" / "train", root)
    if backbone is None:
        return
    kind, name = resolve_backbone(backbone)
    for source in SOURCES:
        if kind == "path":
            model, tok = load_encoder(name), load_tokenizer(name)
        else:
            tok = train_tokenizer(synth.corpus(root / "synth"), kind="encoder")
            model = build_model(name, tok, num_labels=2)
        save_pretrained(model, tok, root / "classifier" / source)
        (root / "classifier" / source / "calibration.json").write_text(json.dumps({"temperature": 1.0, "gamma": 1.0}))
    counts = {"golden": result.counts["valid"], "verbose": result.counts["valid"], "sloppy": result.counts["valid"]}
    write_success(root / "classifier", {"fingerprint": "bench", "sources": list(SOURCES), "response_counts": counts})


def child(mode: str, rows: int, backbone: str, actors: int) -> dict[str, float]:
    """``memory``: one scoring run of ``rows`` rows on ``actors`` actors, with the peak RSS. ``throughput``: 1 and
    2 actors, each on ``rows`` and on ``3 * rows`` rows (the same classifiers), in the order 1, 2, 2, 1 for each
    size so neither pool count always runs first."""
    import shutil

    import ray

    from raydora import classify
    from raydora.config import ClassifierConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, rows, backbone)
        sizes = {rows: root / "data"}
        if mode == "throughput":
            big = root / "big"
            prepare(big, 3 * rows, None)  # data only: scored by root's classifiers
            sizes[3 * rows] = big / "data"
        cfg = ClassifierConfig(score_actors=actors, threads_per_worker=1, score_batch_size=32, max_length=64)
        runs: dict[tuple[int, int], float] = {}
        with PeakRSS() as mem:
            order = [actors] if mode == "memory" else [1, 2, 2, 1]
            for n_rows, data_dir in sizes.items():
                for n in order:
                    cfg = ClassifierConfig(**{**cfg.__dict__, "score_actors": n})
                    out = root / f"scored{n}-{n_rows}"
                    shutil.rmtree(out, ignore_errors=True)
                    start = time.perf_counter()
                    classify.score(data_dir, root / "classifier", out, cfg)
                    runs[n, n_rows] = min(runs.get((n, n_rows), float("inf")), time.perf_counter() - start)
    ray.shutdown()
    out = {"rows": rows, "peak_rss_mb": mem.peak / 2**20}
    for n in sorted({n for n, _ in runs}):
        out[f"seconds_{n}_actors"] = runs[n, rows]
        out[f"responses_per_s_{n}_actors"] = 4 * rows / runs[n, rows]
        if (n, 3 * rows) in runs:
            # Marginal rate: the 2 * rows extra rows over the extra time. Fixed costs (actor start-up, loading
            # the classifiers, planning) cancel out, leaving the pool's steady-state throughput.
            out[f"seconds_{n}_actors_3x"] = runs[n, 3 * rows]
            out[f"marginal_responses_per_s_{n}_actors"] = 8 * rows / (runs[n, 3 * rows] - runs[n, rows])
    return out


def run_child(*args: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.score_scaling", "--child", *args], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(out.stderr[-4000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1000, help="rows for the 1 vs 2 actor throughput run")
    parser.add_argument("--memory-rows", type=int, default=2000, help="N for the N vs 10N memory run")
    parser.add_argument("--backbone", default="auto", help="classifier.backbone (auto: MiniLM when installed)")
    parser.add_argument("--memory-backbone", default="tiny-bert", help="backbone for the (long) memory run")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, rows, backbone, actors = args.child
        print(json.dumps(child(mode, int(rows), backbone, int(actors))))
        return
    speed = run_child("throughput", str(args.rows), args.backbone, "2")
    speedup = speed["responses_per_s_2_actors"] / speed["responses_per_s_1_actors"]
    steady = speed["marginal_responses_per_s_2_actors"] / speed["marginal_responses_per_s_1_actors"]
    print(json.dumps(speed))
    print(f"2 actors vs 1: {steady:.2f}x steady state (target >= 1.8); {speedup:.2f}x end to end at {args.rows} rows")
    small = run_child("memory", str(args.memory_rows), args.memory_backbone, "2")
    large = run_child("memory", str(10 * args.memory_rows), args.memory_backbone, "2")
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    print(json.dumps(small), json.dumps(large))
    print(f"10x rows -> {ratio:.2f}x peak memory (target < 1.5)")
    result = {"throughput": speed, "speedup_2_vs_1_actors": steady, "speedup_end_to_end": speedup,
              "speedup_target": ">= 1.8",
              "memory": [small, large], "memory_ratio_10x_rows": ratio, "memory_target": "< 1.5",
              "backbone": args.backbone, "memory_backbone": args.memory_backbone}  # fmt: skip
    print(f"written to {record('score_scaling', result)}")


if __name__ == "__main__":
    main()
