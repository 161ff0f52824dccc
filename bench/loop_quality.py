"""Robust objectives in the online loop on the benchmark (issue 27): 3 rounds of sample -> label -> train from the
SFT policy, per labeller and objective, and how each round's policy fares by the gold reward.

One base run (the demo's config: synth, validate, SFT) is shared by every arm; an arm is a child run folder that
links the base's upstream folders (``raydora.experiment.link_shared``) and runs ``raydora loop`` on them, so all
arms start from the same SFT policy and sample the same prompts. The arms:

- ``gold-erm``: DPO labelled by the benchmark's gold reward (the oracle labeller);
- ``biased-erm``: DPO labelled by the biased labeller (long, confident answers win), the synthetic-label case;
- ``biased-dora``: the same labels under DoRA (``loop.keep_golden``: each round's classifier learns the prompt's
  golden responses against that round's samples);
- ``biased-kldpo``: the same labels under KLDPO.

Reported per arm and round, by the gold reward on the run's held-out evaluation prompts (never sampled for
training): the win rate against the round before (the loop's own evaluation), the win rate against the SFT policy
(the same SFT samples for every arm: one model, prompts and seed), the policy's mean gold reward; and per round, the
head-to-head win rate of each robust arm's policy against ``biased-erm``'s (95% bootstrap intervals over prompts).

    .venv/bin/python -m bench.loop_quality --tag lr1e-4 train.lr=1e-4   # 4 arms x 3 rounds, ~9 min on 2 cores
    .venv/bin/python -m bench.loop_quality --report --tag lr1e-4          # the table over the seeds recorded
    .venv/bin/python -m bench.loop_quality --arms biased-erm biased-dora --rounds 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench.common import record

ROOT = Path(__file__).resolve().parents[1]

# Each arm's overrides on the demo config (the loop trains pairwise losses: DPO on each row's best and worst).
ARMS: dict[str, list[str]] = {
    "gold-erm": ["loop.reward=gold", "train.objective=erm"],
    "biased-erm": ["loop.reward=biased", "train.objective=erm"],
    "biased-dora": ["loop.reward=biased", "train.objective=dora"],
    "biased-kldpo": ["loop.reward=biased", "train.objective=kldpo", "train.kldpo_normalize=true"],
}
# What every run shares: the demo's config with DPO, training and classifiers in the driver process (the same math
# as Ray Train's workers on the same global batch, without their start-up in every round).
SHARED = ["train.loss=dpo", "train.num_workers=0", "classifier.num_workers=0", "sft.num_workers=0"]


def overrides(root: Path, seed: int, prompts: int | None, samples: int) -> list[str]:
    over = [f"root={root}", f"seed={seed}", *SHARED, f"loop.samples={samples}"]
    return over + ([f"loop.prompts={prompts}"] if prompts else [])


def head_to_head(run_dir: Path, a: Path, b: Path, cfg: Any) -> dict[str, Any]:
    """Gold win rate of generation folder ``a`` against ``b`` on the evaluation prompts (``a`` as the policy)."""
    from raydora import generate as gen
    from raydora.evaluate import build_report

    prompts = gen.read_prompts(gen.prompt_source(cfg, run_dir), cfg.evaluate.prompts)
    tables = {"policy": gen.read_generations(a), "sft": gen.read_generations(b)}
    report = build_report(prompts, tables, "gold", references=("sft",), bootstrap=cfg.evaluate.bootstrap, seed=cfg.seed)
    w = report["win_rates"]["sft"]
    return {"win_rate": w["win_rate"], "ci95": w["ci95"], "mean_reward": report["mean_reward"]["policy"]}


def run_arm(config: str, base: Path, over: list[str], arm: str, rounds: int) -> list[dict[str, Any]]:
    """``rounds`` rounds of the loop in the arm's child folder; per round the loop's summary and its seconds."""
    from raydora import loop
    from raydora.config import load_config
    from raydora.experiment import link_shared

    cfg = load_config(config, [*over, f"name={arm}", *ARMS[arm]])
    link_shared(base, cfg.run_dir, ("synth", "tokenizer", "init", "data", "quarantine", "sft", "sft_data"))
    timings: list[dict[str, Any]] = []
    summaries = loop.run(cfg, rounds, timings=timings)
    for s, t in zip(summaries, timings, strict=True):
        s["seconds"] = t["seconds"]
    return summaries


def rate(w: dict[str, Any] | None) -> str:
    """A win rate and its interval as the evaluation report prints it; "-" for a column the arm has not."""
    from raydora.reporting import fmt_rate

    return fmt_rate(w) if w else "-"


def report(tag: str, out_dir: Path = ROOT / "bench" / "results") -> str:
    """A markdown table over the seeds recorded under ``tag``: per arm and round, the mean over seeds of each win
    rate and how many seeds' intervals lie above 0.5 (``k/n``)."""
    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"loop_quality{'_' + tag if tag else ''}_s*.json"))]
    if not runs:
        raise FileNotFoundError(f"{out_dir}: no loop_quality{'_' + tag if tag else ''}_s*.json")
    n = len(runs)
    sft = [r["sft_gold_reward"] for r in runs if "sft_gold_reward" in r]
    lines = [
        f"Means over {n} seed(s); (k/{n}): the seeds whose 95% interval lies above 0.5."
        + (f" The SFT policy's gold reward: {sum(sft) / len(sft):.3f}." if sft else ""),
        "",
        "| arm | round | gold reward | vs previous round | vs SFT | vs biased-erm |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    for arm, rows in runs[0]["arms"].items():
        for i, row in enumerate(rows):
            per = [r["arms"][arm][i] for r in runs]
            cells = []
            for key in ("vs_previous", "vs_sft", "vs_biased_erm"):
                ws = [p[key] for p in per if p.get(key) and p[key]["win_rate"] is not None]
                if not ws:
                    cells.append("-")
                    continue
                above = sum(w["ci95"][0] > 0.5 for w in ws)
                cells.append(f"{sum(w['win_rate'] for w in ws) / len(ws):.3f} ({above}/{len(ws)})")
            gold = sum(p["gold_reward"] for p in per) / n
            lines.append(f"| {arm} | {row['round']} | {gold:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "demo_cpu.yaml"))
    ap.add_argument("--root", default=str(ROOT / "runs" / "loop_quality"))
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=None, help="training prompts per round (default: all)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt")
    ap.add_argument("--tag", default="", help="recorded as bench/results/loop_quality[_TAG]_s<seed>.json")
    ap.add_argument("--report", action="store_true", help="only print the table over the seeds recorded under --tag")
    ap.add_argument("overrides", nargs="*", help="more config overrides for every run (key=value)")
    args = ap.parse_args()
    if args.report:
        print(report(args.tag), end="")
        return

    from raydora import pipeline
    from raydora.config import load_config

    root = Path(args.root) / f"s{args.seed}"
    over = [*overrides(root, args.seed, args.prompts, args.samples), *args.overrides]
    base_cfg = load_config(args.config, [*over, "name=base"])
    start = time.perf_counter()
    pipeline.run(base_cfg, ["synth", "validate", "sft"])
    arms = {arm: run_arm(args.config, base_cfg.run_dir, over, arm, args.rounds) for arm in args.arms}

    # Every arm's round-1 baseline is the SFT policy's samples of the same prompts with the same seed.
    first = next(iter(arms))
    sft_samples = root / first / "loop" / "round1" / "generations" / "sft"
    sft = head_to_head(root / first, sft_samples, sft_samples, base_cfg)
    result: dict[str, Any] = {
        "config": args.config,
        "overrides": args.overrides,
        "seed": args.seed,
        "rounds": args.rounds,
        "sft_gold_reward": sft["mean_reward"],
        "arms": {},
    }
    for arm, summaries in arms.items():
        rows = []
        for s in summaries:
            policy = Path(s["policy"]).parents[1] / "generations" / "policy"
            vs_sft = head_to_head(root / arm, policy, sft_samples, base_cfg)
            row = {
                "round": s["round"],
                "rows": s["rows"],
                "dropped": s["dropped"],
                "sample_reward_mean": s["sample_reward_mean"],
                "vs_previous": {"win_rate": s["win_rates"].get("sft"), "ci95": s["win_rate_ci95"].get("sft")},
                "vs_sft": {"win_rate": vs_sft["win_rate"], "ci95": vs_sft["ci95"]},
                "gold_reward": vs_sft["mean_reward"],
                "seconds": round(s["seconds"], 1),
            }
            if arm != "biased-erm" and "biased-erm" in arms and s["round"] <= len(arms["biased-erm"]):
                erm = root / "biased-erm" / "loop" / f"round{s['round']}" / "generations" / "policy"
                vs = head_to_head(root / arm, policy, erm, base_cfg)
                row["vs_biased_erm"] = {"win_rate": vs["win_rate"], "ci95": vs["ci95"]}
            rows.append(row)
        result["arms"][arm] = rows
    result["wall_s"] = round(time.perf_counter() - start, 1)

    print("arm           round  rows  gold reward  vs previous round      vs SFT                 vs biased-erm")
    for arm, rows in result["arms"].items():
        for r in rows:
            print(
                f"{arm:<13} {r['round']:>5}  {r['rows']:>4}  {r['gold_reward']:>11.3f}  {rate(r['vs_previous']):<21}  "
                f"{rate(r['vs_sft']):<21}  {rate(r.get('vs_biased_erm'))}",
                flush=True,
            )
    name = "_".join(x for x in ("loop_quality", args.tag, f"s{args.seed}") if x)
    print(f"recorded: {record(name, result)}", flush=True)


if __name__ == "__main__":
    main()
