"""Online-loop round time with live generators and weight sync against fresh generators every sampling, as ratios
measured in one run on one machine (issue 27).

A base run (synth and validate of a small benchmark, tiny GPT-2, no SFT) is copied once per loop, and the loop
runs ``--rounds`` rounds on each copy with ``loop.live_generators`` on (one pool of generator actors for the whole
loop, each round's policy synced into it through the object store) or off (a fresh Ray Data actor pool, loading
the policy from disk, for each of a round's samplings: its training prompts and its evaluation's policy folder, and
in round 1 the evaluation's baseline, which later rounds link from the round before in both modes). The loops
alternate, ``--repeats`` times each.
Round 1 of a live loop also starts the pool; rounds 2 and later are the steady state and are the ones compared:

- ``round_ratio``: a fresh-generator round's seconds over a live round's (median over rounds >= 2 and repeats);
  target >= 1.3x with the hf backend (>= 2x with vLLM's CPU build: run this under .venv-vllm with
  ``--backend vllm``);
- ``sync_share``: the weight sync's seconds over its round's (target < 2% for the demo policy);
- the win rate of each round against the round before it (the loop's own evaluation), per round.

    .venv/bin/python -m bench.loop_speed --rounds 3 --repeats 1
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record


def base_overrides(root: Path, backend: str, prompts: int, samples: int) -> list[str]:
    """A small DPO loop on the benchmark: tiny GPT-2 (small-gpt2 for vLLM, whose CPU attention needs head size 32),
    the biased labeller, hf (or vLLM) generators."""
    policy = "small-gpt2" if backend == "vllm" else "tiny-gpt2"
    return [
        f"root={root}", "name=base", "synth.rows=256", "synth.k=4", "synth.eval_rows=64", f"model.policy={policy}",
        "model.precision=fp32", "model.max_length=96", "sft.enabled=false", "reference.actors=1",
        "train.loss=dpo", "train.objective=erm", "train.batch_size=16", "train.micro_batch_size=16",
        "train.num_workers=1", "train.max_steps=4", "train.warmup_ratio=0.0", f"generate.backend={backend}",
        "generate.actors=1", "generate.max_new_tokens=24", "generate.temperature=1.0", "generate.batch_size=32",
        "evaluate.prompts=64", "evaluate.bootstrap=200", f"loop.samples={samples}", f"loop.prompts={prompts}",
        "loop.reward=biased",
    ]  # fmt: skip


def one_loop(base: Path, overrides: list[str], live: bool, rounds: int, tag: str) -> list[dict[str, Any]]:
    """``rounds`` rounds on a fresh copy of the base run; each round's timings and win rate."""
    from raydora import loop
    from raydora.config import load_config

    name = f"{tag}-{'live' if live else 'fresh'}"
    shutil.copytree(base / "base", base / name, symlinks=True)
    cfg = load_config(None, [*overrides, f"name={name}", f"loop.live_generators={str(live).lower()}"])
    timings: list[dict[str, Any]] = []
    summaries = loop.run(cfg, rounds, timings=timings)
    for t, s in zip(timings, summaries, strict=True):
        t["win_rate_vs_previous"] = s["win_rates"].get("sft")
    shutil.rmtree(base / name, ignore_errors=True)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=64, help="training prompts per round")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--backend", default="hf", choices=["hf", "vllm"])
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be >= 2: round 1 of a live loop starts its pool; rounds 2+ are compared")

    import ray

    from raydora import synth, validate
    from raydora.config import load_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    root = Path(tempfile.mkdtemp(prefix="loop-speed-"))
    try:
        overrides = base_overrides(root, args.backend, args.prompts, args.samples)
        cfg = load_config(None, overrides)
        synth.run(cfg, cfg.run_dir)
        validate.run(cfg, cfg.run_dir)
        runs: dict[str, list[dict[str, Any]]] = {"live": [], "fresh": []}
        start = time.perf_counter()
        for rep in range(args.repeats):  # alternate the two loops: the machine's noise hits both
            for live in (True, False):
                runs["live" if live else "fresh"] += one_loop(root, overrides, live, args.rounds, f"r{rep}")
        steady = {k: [t for t in v if t["round"] >= 2] for k, v in runs.items()}
        live_s = statistics.median(t["seconds"] for t in steady["live"])
        fresh_s = statistics.median(t["seconds"] for t in steady["fresh"])
        shares = [t["sync_seconds"] / t["seconds"] for t in steady["live"]]
        result = {
            "backend": args.backend,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "prompts_per_round": args.prompts,
            "samples_per_prompt": args.samples,
            "live_round_s": round(live_s, 2),
            "fresh_round_s": round(fresh_s, 2),
            "round_ratio": round(fresh_s / live_s, 3),
            "sync_s": round(statistics.median(t["sync_seconds"] for t in steady["live"]), 4),
            "sync_share": round(statistics.median(shares), 5),
            "rounds_detail": runs,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(
            f"round (rounds >= 2, median): live {live_s:.1f} s, fresh {fresh_s:.1f} s, "
            f"fresh / live {fresh_s / live_s:.2f}x; sync {result['sync_s']:.3f} s = "
            f"{100 * result['sync_share']:.2f}% of a live round",
            flush=True,
        )
        for mode, rows in runs.items():
            for t in rows:
                wr = t["win_rate_vs_previous"]
                print(
                    f"  {mode:>5} round {t['round']}: {t['seconds']:.1f} s, sync {t['sync_seconds']:.3f} s, "
                    f"train {t['train_seconds'] or 0:.1f} s, win rate vs previous {wr if wr is None else round(wr, 3)}",
                    flush=True,
                )
        print(f"recorded: {record(f'loop_speed_{args.backend}', result)}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
