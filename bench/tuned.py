"""Tuned rows of the method matrix: each method's strength, learning rate and beta chosen by ``raydora tune`` on a
small clean validation set, then sampled and evaluated like every other row of ``docs/results.md``.

    python -m bench.tuned                                         # every method of SPACES, seeds 0-2, 200 pairs
    python -m bench.tuned --methods erm dora --validation-rows 50 200 1000    # the validation-size sweep
    python -m bench.tuned --report-only                           # bench/results/tuned.json from finished runs

Per (seed, method, validation size) the search is a child of the seed's noise-0 base run of ``bench.experiments``
(``runs/experiments/s<seed>-n00/tune_<method>_v<rows>``, every upstream stage linked), so it reuses the base's SFT
policy, classifiers and reference pass. Its validation pairs are gold-labelled rows drawn apart from the train, SFT
and evaluation prompts (``raydora.synth.validation_rows``): the selection never sees the evaluation prompts. The
best trial's run folder then samples and is evaluated as the matrix's method runs are, and
``<method>_tuned_v<rows>`` links to it, so ``bench.experiments.summarise`` reads it like any other row.

Trials train in their own process (``train.num_workers=0``; two trials at once, each with the one torch thread
that Ray gives a 0.01-CPU task) instead of the matrix's 2 Ray Train workers: the same math on the same global batch,
without Ray Train's start-up in every trial.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# Every pairwise method (ERM included, so the comparison is fair) searches DPO's beta and the learning rate...
COMMON: dict[str, str] = {"train.lr": "loguniform(3e-5, 1e-3)", "train.beta": "loguniform(0.03, 1)"}
# ... and its robustness strength. RRHF has no beta: it searches the weight of its SFT term instead.
SPACES: dict[str, dict[str, str]] = {
    "erm": COMMON,
    "reweight": COMMON,
    "kl_dro": {**COMMON, "train.lam": "loguniform(0.03, 10)"},
    "dora": {**COMMON, "train.lam": "loguniform(0.03, 10)"},
    "kldpo": {**COMMON, "train.tau": "loguniform(0.03, 10)"},
    "wdpo": {**COMMON, "train.rho": "loguniform(0.001, 1)"},
    "dr_dpo": {**COMMON, "train.beta_prime": "loguniform(0.1, 10)"},
    "rdpo": {**COMMON, "train.flip_rate": "uniform(0.05, 0.45)"},
    # RRHF alone (ERM) searches what RRHF + DoRA does but the strength: the fair baseline of the DoRA row (the
    # demo's searches, docs/tune.md: the two drew the same lr and SFT weight in 4 trials and DoRA won all 4).
    "rrhf": {"train.lr": COMMON["train.lr"], "train.sft_weight": "loguniform(0.1, 10)"},
    "rrhf+dora": {
        "train.lr": COMMON["train.lr"],
        "train.lam": "loguniform(0.03, 10)",
        "train.sft_weight": "loguniform(0.1, 10)",
    },
}
# The validation metrics a search's trial can be picked by (raydora.tune reports the first three; the harness computes
# the reward's from the trials' samples of the validation prompts).
SELECT = ("reward_win_rate", "logp_accuracy", "accuracy", "margin")
# How the trials run (see the module docstring).
TRIAL_OVERRIDES = ["train.num_workers=0", "tune.max_concurrent_trials=2", "tune.scheduler=fifo"]


def folder(method: str) -> str:
    return method.replace("+", "_")


def name(method: str, rows: int) -> str:
    return f"{folder(method)}_tuned_v{rows}"


def search_overrides(method: str, rows: int, samples: int) -> list[str]:
    """The search child's overrides: the method's own keys, the space, the validation size, how trials run."""
    from raydora.experiment import method_overrides

    return [
        f"name=tune_{folder(method)}_v{rows}",
        *method_overrides(method, 0.0),
        *(f"tune.space.{k}={v}" for k, v in SPACES[method].items()),
        f"tune.validation_rows={rows}",
        f"tune.num_samples={samples}",
        *TRIAL_OVERRIDES,
    ]


def run_tuned(
    config: str, root: Path, seed: int, method: str, rows: int, samples: int, select: str, extra: list[str]
) -> Path:
    """Search ``method`` at ``seed`` on ``rows`` validation pairs, then sample and evaluate the trial with the best
    ``select`` validation metric; returns the ``<method>_tuned_v<rows>`` link to that trial's run folder. A finished
    search is not run again (another ``select`` only picks again); an evaluated trial is not sampled again."""
    from bench.experiments import pick, shared_overrides
    from raydora import pipeline, tune
    from raydora.config import load_config
    from raydora.experiment import REUSE_UPSTREAM, link_shared

    seed_dir = root / f"s{seed}-n00"
    base = seed_dir / "base"
    if not (base / "reference" / "_SUCCESS").exists():
        raise FileNotFoundError(f"{base}: run the matrix's base first (python -m bench.experiments --seeds {seed})")
    cfg = load_config(config, [*shared_overrides(root, seed, 0.0), *extra, *search_overrides(method, rows, samples)])
    search = cfg.run_dir
    if not (search / "tune" / "best.json").exists():
        link_shared(base, search, REUSE_UPSTREAM.linked)
        tune.run(cfg)
    trials = trial_metrics(search, evaluate=False, reward=select == "reward_win_rate")
    trial_dir = search / "tune" / "trials" / pick(trials, select)["trial"]
    pipeline.run(load_config(str(trial_dir / "config.yaml")), ["generate", "evaluate"])  # skipped when evaluated
    link = seed_dir / name(method, rows)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(trial_dir, link.parent))
    return link


def run_lam(config: str, root: Path, seed: int, lam: float, extra: list[str]) -> Path:
    """DPO + DoRA at strength ``lam`` and the config's lr and beta: a point of the lambda -> win-rate curve (a child
    of the seed's base, trained in this process; skipped when evaluated)."""
    from bench.experiments import shared_overrides
    from raydora.config import load_config
    from raydora.experiment import method_overrides, run_child

    over = [f"name=dora_lam{lam:g}", *method_overrides("dora", 0.0), f"train.lam={lam}", "train.num_workers=0"]
    return run_child(
        load_config(config, [*shared_overrides(root, seed, 0.0), *extra, *over]), root / f"s{seed}-n00" / "base"
    )


def trial_metrics(search: Path, evaluate: bool, reward: bool = False) -> list[dict[str, Any]]:
    """Every finished trial of the search in ``search`` (a ``tune_<method>_v<rows>`` folder): its values, its
    validation metrics (the implicit reward's accuracy and margin, which ``raydora tune`` reports, and the policy's own
    log-prob accuracy, log pi(chosen) > log pi(rejected)), and with ``evaluate`` its win rate against SFT on the
    evaluation prompts (each trial sampled and evaluated: a diagnostic of which validation metric predicts the win
    rate, never used to select). With ``reward``, also each trial's ``reward_win_rate`` on the validation prompts
    (``raydora.tune.reward_metrics``: the trial's samples against the SFT policy's, by the gold reward)."""
    from raydora import pipeline
    from raydora.config import load_config
    from raydora.evaluate import heldout_logps, preference_metrics
    from raydora.reference import initial_policy, trained_policy

    out = []
    for result in sorted((search / "tune" / "experiment").glob("trial_*/result.json")):
        lines = result.read_text().strip().splitlines()
        if not lines:
            continue
        last = json.loads(lines[-1])
        trial_dir = Path(last["run_dir"])
        cfg = load_config(str(trial_dir / "config.yaml"))
        validation = search / "tune" / "validation" / "data"
        ref = heldout_logps(cfg, search, "validation_reference", initial_policy(cfg, search), rows=validation)
        pol = heldout_logps(cfg, trial_dir, "validation", trained_policy(trial_dir) or trial_dir, rows=validation)
        m = preference_metrics(pol, ref, cfg.train.beta, resamples=10)
        row = {
            "trial": trial_dir.name,
            "config": last["config"],
            "accuracy": m["accuracy"]["mean"],
            "margin": m["margin"]["mean"],
            "logp_accuracy": m["logp_accuracy"]["mean"],
            "reference_logp_accuracy": float(np.mean(ref[:, 0] > ref[:, 1])),
        }
        if reward:
            from raydora.tune import reward_metrics

            rm = reward_metrics(cfg, trial_dir, search, validation, trained_policy(trial_dir) or trial_dir)
            row["reward_win_rate"] = rm["reward_win_rate"]
        if evaluate:
            pipeline.run(cfg, ["generate", "evaluate"])
            report = json.loads((trial_dir / "eval" / "report.json").read_text())
            row["win_rate"] = report["win_rates"]["sft"]["win_rate"]
        out.append(row)
    return out


def selection(root: Path, seed: int, method: str, rows: int, select: str) -> dict[str, Any]:
    """What the search chose and on what: the chosen trial's values and validation metrics, and the trial count."""
    from bench.experiments import pick

    search = root / f"s{seed}-n00" / f"tune_{folder(method)}_v{rows}"
    trials = trial_metrics(search, evaluate=False, reward=select == "reward_win_rate")
    best = pick(trials, select)
    return {"overrides": best["config"], "trial": best["trial"], "trials": len(trials),
            **{k: best[k] for k in ("accuracy", "margin", "logp_accuracy", "reference_logp_accuracy",
                                    "reward_win_rate") if k in best}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "experiments_cpu.yaml"))
    ap.add_argument("--root", default=str(ROOT / "runs" / "experiments"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="*", default=list(SPACES), choices=list(SPACES))
    ap.add_argument("--validation-rows", type=int, nargs="+", default=[200])
    ap.add_argument("--samples", type=int, default=8, help="trials per search")
    ap.add_argument("--select", default="reward_win_rate", choices=[*SELECT],
                    help="the validation metric that picks each search's trial (see docs/results.md)")  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "tuned.json"))
    ap.add_argument("--diagnose", action="store_true",
                    help="also sample and evaluate every trial of these searches: which validation metric predicts "
                         "the win rate")  # fmt: skip
    ap.add_argument("--lam-curve", type=float, nargs="*", default=[],
                    help="also run DPO + DoRA at these strengths (the config's lr and beta)")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="aggregate the finished runs; search nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run")
    args = ap.parse_args(argv)
    root = Path(args.root).absolute()
    from bench.experiments import summarise
    from raydora.config import load_config

    alphas = tuple(load_config(args.config, args.overrides).evaluate.alphas)
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    seconds: dict[str, float] = dict(previous.get("seconds", {}))
    failed: dict[str, str] = {}
    if not args.report_only:
        for rows in args.validation_rows:
            for seed in args.seeds:
                for method in args.methods:
                    key = f"s{seed} {name(method, rows)}"
                    t0 = time.perf_counter()
                    try:
                        run_tuned(args.config, root, seed, method, rows, args.samples, args.select, args.overrides)
                    except Exception as e:  # noqa: BLE001 (one failed search must not lose the others)
                        failed[key] = f"{type(e).__name__}: {e}"
                        print(f"[tuned] {key} FAILED: {e}", flush=True)
                        continue
                    seconds[key] = round(time.perf_counter() - t0, 1)
                    print(f"[tuned] {key}: {seconds[key]} s", flush=True)
    if not args.report_only:
        for lam in args.lam_curve:
            for seed in args.seeds:
                t0 = time.perf_counter()
                run_lam(args.config, root, seed, lam, args.overrides)
                seconds[f"s{seed} dora_lam{lam:g}"] = round(time.perf_counter() - t0, 1)
    curve: dict[str, Any] = dict(previous.get("lam_curve", {}))
    for lam in args.lam_curve:
        runs = {s: root / f"s{s}-n00" / f"dora_lam{lam:g}" for s in args.seeds}
        if all((p / "eval" / "_SUCCESS").exists() for p in runs.values()):
            curve[f"{lam:g}"] = summarise(runs, alphas)
    trials: dict[str, Any] = dict(previous.get("trials", {}))
    if args.diagnose:
        for rows in args.validation_rows:
            for seed in args.seeds:
                for method in args.methods:
                    search = root / f"s{seed}-n00" / f"tune_{folder(method)}_v{rows}"
                    if (search / "tune" / "best.json").exists():
                        trials[f"s{seed} {name(method, rows)}"] = trial_metrics(search, evaluate=True, reward=True)
    results: dict[str, Any] = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
                               "samples": args.samples, "select": args.select, "spaces": SPACES,
                               "rows": {}, "failed": failed, "seconds": seconds, "trials": trials,
                               "lam_curve": curve}  # fmt: skip
    for rows in sorted({*args.validation_rows, *(int(r) for r in previous.get("rows", {}))}):
        found: dict[str, Any] = {}
        for method in SPACES:
            runs = {s: root / f"s{s}-n00" / name(method, rows) for s in args.seeds}
            runs = {s: p for s, p in runs.items() if (p / "eval" / "_SUCCESS").exists()}
            if not runs:
                old = previous.get("rows", {}).get(str(rows), {}).get(method)
                if old is not None:
                    found[method] = old  # recorded earlier; its runs are gone from this machine
                continue
            chosen = {str(s): selection(root, s, method, rows, args.select) for s in runs}
            found[method] = {**summarise(runs, alphas), "selected": chosen}
        results["rows"][str(rows)] = found
    # The matrix's rows at the config's defaults, from the same bases and code, beside the tuned ones.
    from raydora.experiment import METHODS

    results["defaults"] = dict(previous.get("defaults", {}))
    for method in METHODS:
        runs = {s: root / f"s{s}-n00" / folder(method) for s in args.seeds}
        if all((p / "eval" / "_SUCCESS").exists() for p in runs.values()):
            results["defaults"][method] = summarise(runs, alphas)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    for m, r in results["defaults"].items():
        print(f"  default {m:9s} {r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
    for rows, found in results["rows"].items():
        print(f"\n{rows} validation pairs: win rate vs SFT (mean over seeds, 95% CI) | chosen per seed")
        for m, r in found.items():
            chosen = "; ".join(
                ", ".join(f"{k.split('.')[-1]}={v:.3g}" for k, v in sel["overrides"].items())
                for sel in r["selected"].values()
            )
            print(f"  {m:9s} {r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {chosen}")


if __name__ == "__main__":
    main()
