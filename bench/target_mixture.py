"""DoRA without source labels: one target-vs-mixture classifier (``data.target``) against DoRA's per-source
classifiers, on the offline shift benchmark, into ``bench/results/target_mixture.json``.

    python -m bench.target_mixture                  # seeds 0 1 2, in runs/experiments (the matrix's runs)
    python -m bench.target_mixture --seeds 0        # one seed
    python -m bench.target_mixture --dry-run        # tiny sizes in runs/target_mixture_dry: checks the plumbing
    python -m bench.target_mixture --report-only    # aggregate the finished runs again; train nothing

Two arms per seed, both the ``dora`` row of ``bench/experiments.py``'s method matrix (label noise 0: the same
config, seed, loss, objective, lr and steps, the same shared base run and the same evaluation):

- ``dora``: the matrix's own run (reused when ``make results`` already made it), per-source classifiers on the
  benchmark's ``sources`` labels (golden vs verbose, golden vs sloppy);
- ``dora_target``: the benchmark's train split with every response's source set to ``unknown`` (``data.input``)
  and ``data.target`` = the train split's golden responses (the curated target set a user would have; the eval
  prompts are never used): one classifier, target vs every training response, and DoRA's one-mixture ratio. It
  shares the base's synth, tokenizer, SFT model and SFT samples (symlinks, as the matrix's oracle does) and runs
  its own validate, classify and reference pass; ``generate.prompts`` is the base's eval split and
  ``evaluate.reward=gold``, so both arms sample the same prompts with the same seeds.

The headline is the matrix's: gold-reward (alpha 0.8) win + tie/2 against the SFT policy's samples, the 95% CI a
two-level bootstrap over seeds, then prompts (``raydora.experiment.two_level_ci``). The arms also get a paired
difference (per prompt, the same prompts in both) with the same bootstrap, and per seed the classifiers' AUC and
where each arm puts its DoRA weight by the rows' true source pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import experiments as exp
from raydora.experiment import DOWNSTREAM, OWN_DATA, ChildPlan, method_overrides, run_child, two_level_ci

ROOT = exp.ROOT
ARMS = {"dora": "DoRA, per-source classifiers (source labels)", "dora_target": "DoRA, target vs mixture (no labels)"}
# The target arm computes what depends on its unlabelled data; everything else is the base's (as the oracle's).
TARGET = ChildPlan(own=OWN_DATA.own, stages=("validate", "classify", "reference", *DOWNSTREAM))
# --dry-run: the plumbing on a few rows and steps (the tiny encoder, no MiniLM), in minutes on 2 CPUs.
DRY_RUN = [
    "synth.rows=48", "synth.eval_rows=8", "synth.sft_rows=96", "model.max_length=64", "sft.epochs=1",
    "train.max_steps=2", "train.checkpoint_every=2", "classifier.backbone=tiny-bert", "classifier.epochs=1",
    "classifier.max_length=32", "classifier.score_actors=1", "generate.max_new_tokens=8", "evaluate.prompts=6",
    "evaluate.bootstrap=100",
]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """``rows`` as JSON lines at ``path``, rewritten only when the text changes (an unchanged file keeps its
    mtime, so a resumed run's validate stage still matches its fingerprint)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def target_inputs(base: Path, out: Path) -> tuple[Path, Path]:
    """From the base's synth ``train`` split: the rows with every source ``unknown`` (``train/rows.jsonl``) and
    their golden responses as ``{prompt, response}`` rows (``target.jsonl``)."""
    rows = [json.loads(line) for f in sorted((base / "synth" / "train").glob("*.json"))
            for line in f.read_text().splitlines() if line.strip()]  # fmt: skip
    if not rows:
        raise FileNotFoundError(f"{base / 'synth' / 'train'}: no rows; run the base first")
    target = [{"prompt": r["prompt"], "response": text}
              for r in rows for text, s in zip(r["responses"], r["sources"], strict=True) if s == "golden"]  # fmt: skip
    unlabelled = [{**r, "sources": ["unknown"] * len(r["responses"])} for r in rows]
    return _write_jsonl(out / "train" / "rows.jsonl", unlabelled), _write_jsonl(out / "target.jsonl", target)


def run_target(config: str, root: Path, seed: int, extra: list[str]) -> Path:
    """The ``dora_target`` arm of one seed, next to the matrix's ``dora`` run (skipped when evaluated)."""
    from raydora.config import load_config

    base = root / f"s{seed}-{exp._tag(0.0)}" / "base"
    child = base.parent / "dora_target"
    train_rows, target = target_inputs(base, child / "inputs")
    over = [*exp.shared_overrides(root, seed, 0.0), "name=dora_target", *extra, *method_overrides("dora", 0.0),
            f"data.input={train_rows.parent.absolute()}", f"data.target={target.absolute()}",
            f"generate.prompts={(base / 'synth' / 'eval').absolute()}", "evaluate.reward=gold"]  # fmt: skip
    return run_child(load_config(config, over), base, TARGET)


# ---- aggregation --------------------------------------------------------------------------------------------------
def weights_by_pair(run: Path, sources: dict[str, list[str]]) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """The DoRA row weights h~ of ``run``'s scored rows (pairwise: each row's best-vs-worst pair, as the trainer),
    in row-id order, and per (chosen > rejected) pair of the rows' true ``sources`` the share of rows and of the
    summed weight (as ``experiments.dora_pair_weights``, but by the true sources: the target arm's are unknown)."""
    rows = exp.scored_rows(run)
    rows.sort(key=lambda r: r["id"])
    h, select = exp.dora_weights(run, rows)
    share: dict[str, dict[str, float]] = {}
    for r, w, (best, worst) in zip(rows, h, select, strict=True):
        at = share.setdefault(f"{sources[r['id']][int(best)]} > {sources[r['id']][int(worst)]}", dict.fromkeys(
            ("rows", "weight"), 0.0))  # fmt: skip
        at["rows"] += 1 / len(rows)
        at["weight"] += float(w) / float(h.sum())
    return dict(sorted(share.items())), h


def seed_diagnostics(runs: dict[str, Path]) -> dict[str, Any]:
    """One seed: each arm's classifiers (AUC, gamma), DoRA weight share by true source pair, and the correlation
    of the two arms' row weights."""
    import pyarrow.parquet as pq

    base = runs["dora"].parent / "base"
    sources = {r["id"]: r["sources"] for f in sorted((base / "data").glob("*.parquet"))
               for r in pq.read_table(f, columns=["id", "sources"]).to_pylist()}  # fmt: skip
    out: dict[str, Any] = {}
    weights = {}
    for arm, run in runs.items():
        clf = json.loads((run / "classifier" / "_SUCCESS").read_text())["classifiers"]
        shares, weights[arm] = weights_by_pair(run, sources)
        out[arm] = {"classifiers": {k: {"auc": v.get("auc"), "gamma": v.get("gamma")} for k, v in clf.items()},
                    "weight_share": shares}  # fmt: skip
    if len(weights) == 2 and len(weights["dora"]) == len(weights["dora_target"]):
        out["weight_correlation"] = float(np.corrcoef(weights["dora"], weights["dora_target"])[0, 1])
    return out


def summarise(root: Path, seeds: list[int], alphas: tuple[float, ...]) -> dict[str, Any]:
    """Both arms over the seeds that finished both (``experiments.summarise``), their per-prompt paired difference
    with the same two-level bootstrap, and whether the target arm's mean lies in the per-source arm's CI."""
    runs = {s: {a: root / f"s{s}-{exp._tag(0.0)}" / a for a in ARMS} for s in seeds}
    runs = {s: r for s, r in runs.items() if all((p / "eval" / "_SUCCESS").exists() for p in r.values())}
    if not runs:
        return {"seeds": []}
    arms = {a: exp.summarise({s: r[a] for s, r in runs.items()}, alphas) for a in ARMS}
    diffs = {}
    for s, r in runs.items():
        by = {a: np.asarray(exp.per_prompt(p, ())[None]["scores"]) for a, p in r.items()}
        if by["dora"].shape != by["dora_target"].shape:
            raise ValueError(f"seed {s}: the arms sampled different prompts ({by['dora'].size} vs "
                             f"{by['dora_target'].size})")  # fmt: skip
        diffs[s] = by["dora_target"] - by["dora"]
    ref, tgt = arms["dora"], arms["dora_target"]
    return {
        "seeds": sorted(runs),
        "arms": arms,
        "difference": {
            "mean": float(np.mean([d.mean() for d in diffs.values()])),
            "ci95": two_level_ci([list(d) for d in diffs.values()]),
            "per_seed": {str(s): float(d.mean()) for s, d in diffs.items()},
        },
        "within_ci": ref["ci95"][0] <= tgt["win_rate"] <= ref["ci95"][1],
        "diagnostics": {str(s): seed_diagnostics(r) for s, r in runs.items()},
    }


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a small markdown section (for docs/results.md)."""
    if not result.get("seeds"):
        return "No seed has finished both arms yet."
    d = result["difference"]
    lines = ["| method | win rate vs SFT [95% CI] | per seed | gold reward (SFT) | filler | confident |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for arm, r in result["arms"].items():
        per = ", ".join(f"{v:.2f}" for v in r["per_seed"].values())
        lines.append(f"| {ARMS[arm]} | {exp._rate(r)} | {per} | {r['reward']:.3f} ({r['reward_sft']:.3f}) | "
                     f"{r['artefacts']['filler']:.2f} | {r['artefacts']['confident']:.2f} |")  # fmt: skip
    per = ", ".join(f"{v:+.3f}" for v in d["per_seed"].values())
    corr = [v["weight_correlation"] for v in result["diagnostics"].values() if "weight_correlation" in v]
    lines += [
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}. Target minus per-source, paired by prompt: "
        f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (per seed {per}). The target arm's mean "
        f"{'lies' if result['within_ci'] else 'does not lie'} within the per-source arm's 95% CI."
        + (f" Correlation of the two arms' DoRA row weights: {', '.join(f'{c:.2f}' for c in corr)}." if corr else ""),
    ]
    shares = [v for v in result["diagnostics"].values() if len(v) == 3]  # seeds with both arms' weights
    pairs = sorted({k for v in shares for k in v["dora"]["weight_share"]})
    if pairs:
        lines += ["", "Where each arm puts its DoRA weight, by the rows' true best-vs-worst source pair (mean share "
                  "over the seeds):", "", "| pair (chosen > rejected) | rows | weight, per-source | weight, target |",
                  "|---|---|---|---|"]  # fmt: skip
        for k in pairs:
            cells = [np.mean([v[a]["weight_share"].get(k, {}).get(x, 0.0) for v in shares])
                     for a, x in (("dora", "rows"), ("dora", "weight"), ("dora_target", "weight"))]  # fmt: skip
            lines.append(f"| {k} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "experiments_cpu.yaml"))
    ap.add_argument("--root", default=None, help="runs folder (default runs/experiments; --dry-run: "
                    "runs/target_mixture_dry)")  # fmt: skip
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/target_mixture.json; "
                    "--dry-run: <root>/target_mixture.json)")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes in their own root, to check the plumbing")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), help="which arms to run")
    ap.add_argument("--report-only", action="store_true", help="aggregate the finished runs; train nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run (both arms and the base)")
    args = ap.parse_args(argv)
    root = Path(args.root or ROOT / "runs" / ("target_mixture_dry" if args.dry_run else "experiments")).absolute()
    out = Path(args.out or (root / "target_mixture.json" if args.dry_run else
                            ROOT / "bench" / "results" / "target_mixture.json"))  # fmt: skip
    extra = [*(DRY_RUN if args.dry_run else []), *args.overrides]
    from raydora.config import load_config

    alphas = tuple(load_config(args.config, extra).evaluate.alphas)
    previous = json.loads(out.read_text()) if out.exists() else {}
    seconds: dict[str, float] = dict(previous.get("seconds", {}))
    failed: dict[str, str] = {}
    if not args.report_only:
        for seed in args.seeds:
            run = root / f"s{seed}-{exp._tag(0.0)}"
            done = (run / "base" / "generations" / "sft" / "_SUCCESS").exists()  # finished runs are not timed again
            t0 = time.perf_counter()
            exp.run_base(exp.base_config(args.config, root, seed, 0.0, extra), None)
            if not done:
                seconds[f"base s{seed}"] = round(time.perf_counter() - t0, 1)
            for arm in args.arms:
                done, t0 = (run / arm / "eval" / "_SUCCESS").exists(), time.perf_counter()
                try:
                    if arm == "dora":
                        exp.run_method(args.config, root, seed, 0.0, "dora", extra)
                    else:
                        run_target(args.config, root, seed, extra)
                except Exception as e:  # noqa: BLE001 (one failed arm must not lose the others)
                    failed[f"s{seed} {arm}"] = f"{type(e).__name__}: {e}"
                    print(f"[target_mixture] s{seed} {arm} FAILED: {e}", flush=True)
                    continue
                if not done:
                    seconds[f"s{seed} {arm}"] = round(time.perf_counter() - t0, 1)
                    print(f"[target_mixture] s{seed} {arm}: {seconds[f's{seed} {arm}']} s", flush=True)
    result = {"config": args.config, "overrides": extra, "root": str(root), **summarise(root, args.seeds, alphas),
              "failed": failed, "seconds": seconds}  # fmt: skip
    result["markdown"] = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\n{result['markdown']}\n\nwritten to {out}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
