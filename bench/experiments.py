"""The method matrix on the offline shift benchmark: every objective, several seeds, a label-noise sweep and the
evaluation-alpha sweep, with bootstrap CIs, into ``bench/results/experiments.json`` and ``docs/results.md``.

    python -m bench.experiments --config jobs/configs/experiments_cpu.yaml            # the whole matrix
    python -m bench.experiments --seeds 0 --noise 0 --methods erm dora oracle         # a slice
    python -m bench.experiments --report-only                                          # tables + plots again

Per (seed, noise) one **base** run does everything the methods share: synth, validate, classify (+ scoring),
SFT, reference log-probs and the SFT policy's evaluation samples. Each method is then a **child** run whose
finished upstream folders are symlinks into its base (their ``_SUCCESS`` fingerprints use relative names, so
they still match), and which runs only ``train -> generate -> evaluate`` (``raydora.experiment``: the method
table, the base/child plans and the interval live there). The oracle child validates the
benchmark's ``oracle`` split (the same rows, ranked by gold) and computes its own reference pass.

The seed draws everything again: the benchmark rows, the SFT model, the classifiers, the data order and the
samples. With the label-noise stream separate from the rows' (``synth.generate_rows``), every noise level holds
the same prompts and responses, so its base reuses the noise-0 SFT model and samples.

Win rates are the gold reward's (at ALPHA0) win + tie/2 of the policy's samples against the SFT policy's, per
prompt; the CI pools the seeds with a two-level bootstrap (resample seeds, then prompts within each seed), so the
interval carries the seed-to-seed spread as well as the prompt sampling. Runs are skipped when finished, so an
interrupted matrix resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from raydora.experiment import (
    BASE_STAGES,
    METHODS,
    child_plan,
    link_shared,
    method_overrides,
    run_child,
    two_level_ci,
)

ROOT = Path(__file__).resolve().parents[1]

# The label-noise sweep's methods: the DoRA ablation (reweight, vanilla DRO, DoRA) and the noise-robust baselines.
NOISE_METHODS = ("erm", "reweight", "kl_dro", "dora", "rdpo", "dr_dpo")


def _tag(noise: float) -> str:
    return f"n{round(noise * 100):02d}"


def shared_overrides(root: Path, seed: int, noise: float) -> list[str]:
    """Every run of (seed, noise): the seed, the noise, and for a noisy one the noise-0 base's tokenizer (the same
    corpus, so the same BPE) and evaluation prompts."""
    over = [f"root={root / f's{seed}-{_tag(noise)}'}", f"seed={seed}", f"synth.label_noise={noise}"]
    if noise:
        noise0 = root / f"s{seed}-{_tag(0.0)}" / "base"
        # The same evaluation prompts as noise 0 (the same files, so the shared SFT samples' marker matches).
        over += [f"model.tokenizer={noise0 / 'tokenizer'}", f"generate.prompts={noise0 / 'synth' / 'eval'}"]
    return over


def base_config(config: str, root: Path, seed: int, noise: float, extra: list[str]) -> Any:
    from raydora.config import load_config

    return load_config(config, [*shared_overrides(root, seed, noise), "name=base", *extra])


def run_base(cfg: Any, noise0: Path | None) -> Path:
    """The shared stages. A noisy base holds the same rows with other labels, so it reuses the noise-0 base's SFT
    model, SFT samples and classifiers (the classifiers read responses and sources, never labels; all symlinked,
    never rewritten): it runs synth and validate, scores its rows, and computes its reference pass."""
    from raydora import classify, pipeline

    run_dir = cfg.run_dir
    if noise0 is None:
        pipeline.run(cfg, BASE_STAGES)
        return run_dir
    link_shared(noise0, run_dir, ("sft", "sft_data", "init", "classifier", "generations/sft"))
    pipeline.run(cfg, ["synth", "validate"])
    print(classify.score(run_dir / "data", run_dir / "classifier", run_dir / "scored", cfg.classifier).summary())
    pipeline.run(cfg, ["reference"])
    return run_dir


def run_method(config: str, root: Path, seed: int, noise: float, method: str, extra: list[str]) -> Path:
    """One method's child of the (seed, noise) base (``raydora.experiment.child_plan``: what it links, what it
    runs); skipped when evaluated."""
    from raydora.config import load_config

    base = root / f"s{seed}-{_tag(noise)}" / "base"
    over = [*shared_overrides(root, seed, noise), f"name={method.replace('+', '_')}", *extra,
            *method_overrides(method, noise)]  # fmt: skip
    if method == "oracle":
        over += [
            f"data.input={(base / 'synth' / 'oracle').absolute()}",
            f"generate.prompts={(base / 'synth' / 'eval').absolute()}",
        ]
    return run_child(load_config(config, over), base, child_plan(method))


# ---- aggregation ------------------------------------------------------------------------------------------------
def per_prompt(child: Path, alphas: tuple[float, ...]) -> dict[float | None, dict[str, Any]]:
    """One run's samples, read once, scored at ALPHA0 (key None) and at each of ``alphas``: per-prompt win scores
    (win + tie/2 against the SFT samples), mean rewards, and (at ALPHA0) the policy's artefact rates."""
    from raydora import evaluate, synth
    from raydora.generate import read_generations, read_prompts

    cfg_prompts = read_prompts(child / "synth" / "eval")
    pol, sft = read_generations(child / "generations" / "policy"), read_generations(child / "generations" / "sft")
    by = {k: dict(zip(t.column("id").to_pylist(), t.column("generations").to_pylist(), strict=True))
          for k, t in (("policy", pol), ("sft", sft))}  # fmt: skip
    ids = [i for i in cfg_prompts.column("id").to_pylist() if i in by["policy"]]
    text = dict(zip(cfg_prompts.column("id").to_pylist(), cfg_prompts.column("prompt").to_pylist(), strict=True))
    out: dict[float | None, dict[str, Any]] = {}
    for alpha in (None, *alphas):
        a = synth.ALPHA0 if alpha is None else alpha
        at: dict[str, Any] = {"scores": [], "reward": [], "reward_sft": []}
        for i in ids:
            rp = [synth.gold_reward(text[i], r, a) for r in by["policy"][i]]
            rs = [synth.gold_reward(text[i], r, a) for r in by["sft"][i]]
            w, t, _ = evaluate.outcomes(rp, rs)
            at["scores"].append(w + t / 2)
            at["reward"].append(float(np.mean(rp)))
            at["reward_sft"].append(float(np.mean(rs)))
        out[alpha] = at
    out[None]["artefacts"] = synth.artefact_rates([r for i in ids for r in by["policy"][i]])
    return out


def scored_rows(run: Path) -> list[dict[str, Any]]:
    """The rows of ``run``'s scored stage (``p_golden`` beside each response), in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((run / "scored").glob("*.parquet"))]).to_pylist()


def dora_weights(run: Path, rows: list[dict[str, Any]]) -> tuple[np.ndarray, Any]:
    """The DoRA row weights h~ of ``rows`` (``run``'s scored rows) as the pairwise trainer computes them, on each
    row's best-vs-worst pair, from ``run``'s scored and classifier markers (shares, gammas, the ratio's form);
    returns the weights and the pairs (chosen, rejected index per row)."""
    from raydora.encoding import pair_indices
    from raydora.step import dora_row_weights

    scored = json.loads((run / "scored" / "_SUCCESS").read_text())
    clf = json.loads((run / "classifier" / "_SUCCESS").read_text())
    info = {"shares": scored["shares"], "gammas": {k: v["gamma"] for k, v in clf["classifiers"].items()},
            "alpha": None, "form": scored.get("form", "per_source")}  # fmt: skip
    select = pair_indices([r["scores"] for r in rows])  # the trainer's chosen and rejected responses
    return dora_row_weights([r["p_golden"] for r in rows], [r["sources"] for r in rows], info, select), select


def dora_pair_weights(base: Path) -> dict[str, dict[str, float]]:
    """Where DoRA puts its weight: per (chosen source > rejected source) of each row's best-vs-worst pair, the
    share of rows and the share of the summed h~ (the DoRA row weight the pairwise trainer uses)."""
    rows = scored_rows(base)
    h, select = dora_weights(base, rows)
    groups: dict[str, list[float]] = {}
    for r, w, (best, worst) in zip(rows, h, select, strict=True):
        groups.setdefault(f"{r['sources'][int(best)]} > {r['sources'][int(worst)]}", []).append(w)
    total = float(h.sum())
    return {k: {"rows": len(v) / len(rows), "weight": float(sum(v)) / total} for k, v in sorted(groups.items())}


def summarise(runs: dict[str, Path], alphas: tuple[float, ...]) -> dict[str, Any]:
    """One method at one noise level over its seeds: win rate vs SFT with the two-level CI, per-seed values,
    gold reward, artefacts, and the alpha sweep (mean reward and win rate at each alpha)."""
    scored = {s: per_prompt(p, alphas) for s, p in runs.items()}
    per = {s: v[None] for s, v in scored.items()}
    scores = [per[s]["scores"] for s in per]
    out: dict[str, Any] = {
        "seeds": sorted(per),
        "win_rate": float(np.mean([np.mean(x) for x in scores])),
        "ci95": two_level_ci(scores),
        "per_seed": {str(s): float(np.mean(per[s]["scores"])) for s in per},
        "reward": float(np.mean([np.mean(per[s]["reward"]) for s in per])),
        "reward_sft": float(np.mean([np.mean(per[s]["reward_sft"]) for s in per])),
        "artefacts": {k: float(np.mean([per[s]["artefacts"][k] for s in per])) for k in ("filler", "confident")},
    }
    sweep = []
    for a in alphas:
        at = {s: v[a] for s, v in scored.items()}
        sweep.append({"alpha": a, "win_rate": float(np.mean([np.mean(at[s]["scores"]) for s in at])),
                      "reward": float(np.mean([np.mean(at[s]["reward"]) for s in at])),
                      "reward_sft": float(np.mean([np.mean(at[s]["reward_sft"]) for s in at]))})  # fmt: skip
    out["sweep"] = sweep
    return out


# ---- docs/results.md ----------------------------------------------------------------------------------------
LABELS = {"erm": "DPO (ERM)", "reweight": "DPO + reweighting", "kl_dro": "DPO + vanilla KL-DRO",
          "dora": "DPO + DoRA", "kldpo": "KLDPO (paper, normalised)", "kldpo_raw": "KLDPO (code: raw, capped)",
          "wdpo": "WDPO", "kl_dro_lam01": "vanilla KL-DRO, lam 0.1", "kldpo_tau01": "KLDPO, tau 0.1",
          "wdpo_rho01": "WDPO, rho 0.1", "dora_platt": "DPO + DoRA, Platt-calibrated", "rdpo": "rDPO",
          "dr_dpo": "Dr.DPO", "dpo_pl": "DPO-PL",
          "dpo_pl+dora": "DPO-PL + DoRA",
          "rrhf": "RRHF", "rrhf+dora": "RRHF + DoRA", "lire": "LIRE", "lire+dora": "LIRE + DoRA",
          "oracle": "oracle (gold labels)"}  # fmt: skip
SWEEP_METHODS = ("erm", "kldpo", "kldpo_tau01", "wdpo", "wdpo_rho01", "dora", "oracle")


def _rate(r: dict[str, Any]) -> str:
    return f"{r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def _order(rows: dict[str, Any], names: list[str]) -> str:
    """``a > b > c`` as the means order them, and whether each gap is larger than both intervals' overlap."""
    ranked = sorted(names, key=lambda m: -rows[m]["win_rate"])
    parts = [ranked[0]]
    for a, b in itertools.pairwise(ranked):
        apart = rows[a]["ci95"][0] > rows[b]["ci95"][1]
        parts.append(f" {'>' if apart else '≳'} {b}")
    return "".join(parts)


def findings(results: dict[str, Any]) -> list[str]:
    """The papers' claims, checked against the numbers: each line says what we measured and whether it holds.
    ``>`` means the 95% intervals are disjoint, ``≳`` that the means are ordered but the intervals overlap."""
    out = []
    main = results["noise"].get("n00", {})
    if {"erm", "oracle"} <= set(main):
        gap = main["oracle"]["win_rate"] - main["erm"]["win_rate"]
        out.append(f"**The benchmark shows the shift.** ERM {_rate(main['erm'])} against the oracle "
                   f"{_rate(main['oracle'])}: a gap of {gap:.3f} in win rate against the SFT policy.")  # fmt: skip
    if {"dora", "reweight", "kl_dro"} <= set(main):
        ordered = sorted(("dora", "reweight", "kl_dro"), key=lambda m: -main[m]["win_rate"])
        means = ", ".join(f"{m} {main[m]['win_rate']:.3f}" for m in ordered)
        holds = ordered == ["dora", "reweight", "kl_dro"]
        out.append(f"**DoRA > reweight > vanilla DRO** (DoRA's ablation): {'holds' if holds else 'does not hold'} "
                   f"in the means; measured {_order(main, ['dora', 'reweight', 'kl_dro'])} "
                   f"({means}).")  # fmt: skip
    for loss in ("dpo_pl", "rrhf", "lire"):
        if {loss, f"{loss}+dora"} <= set(main):
            d = main[f"{loss}+dora"]["win_rate"] - main[loss]["win_rate"]
            out.append(f"**{LABELS[loss]} → + DoRA**: {main[loss]['win_rate']:.3f} → "
                       f"{main[f'{loss}+dora']['win_rate']:.3f} ({d:+.3f}; paper: -0.015 to +0.112).")  # fmt: skip
    gains = []
    for tag, rows in results["noise"].items():
        if {"erm", "dora"} <= set(rows):
            gains.append(f"{int(tag[1:])}%: {rows['dora']['win_rate'] - rows['erm']['win_rate']:+.3f}")
    if gains:
        out.append(f"**DoRA's gain over ERM under label noise** (paper: +0.025 to +0.04 in win rate at 20/40/60%): "
                   f"{'; '.join(gains)}.")  # fmt: skip
    for m in ("rdpo", "dr_dpo", "reweight", "kl_dro"):
        gains = [f"{int(t[1:])}%: {rows[m]['win_rate'] - rows['erm']['win_rate']:+.3f}"
                 for t, rows in results["noise"].items() if {"erm", m} <= set(rows)]  # fmt: skip
        if len(gains) > 1:
            out.append(f"**{LABELS[m]} over ERM under label noise**: {'; '.join(gains)}.")
    spans = {m: [x["win_rate"] for x in main[m]["sweep"]] for m in SWEEP_METHODS if m in main}
    if spans:
        desc = "; ".join(f"{m} {min(v):.3f}–{max(v):.3f} (range {max(v) - min(v):.3f})" for m, v in spans.items())
        out.append(
            f"**Flat under the alpha shift?** Win rate against SFT across the evaluation alphas: {desc}. "
            "The papers find DPO degrading away from the training alpha while KLDPO and WDPO stay flat."
        )
    return out


def _label(method: str) -> str:
    return LABELS.get(method, method)


def tuned_lines(tuned: dict[str, Any], figures: Path, rel: str) -> list[str]:
    """The section of the tuned rows (``bench/results/tuned.json``, written by ``python -m bench.tuned``): per
    validation size, each method's win rate with its strength, lr and beta chosen on the clean validation pairs,
    beside its row at the defaults (made by the same code on the same bases), and the share of the ERM -> oracle
    gap it closes (ERM tuned the same way is the baseline)."""
    defaults = tuned.get("defaults", {})
    oracle = defaults.get("oracle")
    select = tuned.get("select", "accuracy")
    what = {"accuracy": "implicit-reward accuracy", "logp_accuracy": "log-prob accuracy", "margin": "margin",
            "reward_win_rate": "gold-reward win rate of its samples"}[select]  # fmt: skip
    seeds = ", ".join(str(s) for s in tuned["seeds"])
    lines = [
        "## Tuned on a small clean validation set",
        "",
        f"`python -m bench.tuned` (docs/tune.md): per seed ({seeds}) and method, `raydora tune` draws "
        f"{tuned['samples']} trials of the method's space (below) on the seed's base run, keeps the trial with the "
        f"best {what} on the clean validation set (gold-labelled rows drawn apart from the train, SFT and "
        "evaluation prompts), then samples and evaluates that trial's policy like every other row. "
        "'at defaults': the method at the config's values, made by the same code on the same bases (the matrix "
        "below may predate fixes). Gap closed: (tuned - tuned ERM) / (oracle - tuned ERM).",
        "",
    ]
    for rows, found in sorted(tuned["rows"].items(), key=lambda kv: int(kv[0])):
        if not found:
            continue
        erm = found.get("erm")
        lines += [f"**{rows} validation pairs**", "",
                  "| method | tuned: win rate vs SFT [95% CI] | per seed | at defaults | gold reward (SFT) | filler "
                  f"| confident | gap closed | validation {what} (per seed) | chosen (per seed) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in found.items():
            per = ", ".join(f"{v:.2f}" for v in r["per_seed"].values())
            at = _rate(defaults[m]) if m in defaults else ""
            gap = ""
            if erm is not None and oracle is not None and oracle["win_rate"] > erm["win_rate"]:
                gap = f"{(r['win_rate'] - erm['win_rate']) / (oracle['win_rate'] - erm['win_rate']):.0%}"
            acc = ", ".join(f"{sel[select]:.2f}" for sel in r["selected"].values())
            chosen = "; ".join(
                ", ".join(f"{k.split('.')[-1]} {v:.3g}" for k, v in sel["overrides"].items())
                for sel in r["selected"].values()
            )
            lines.append(f"| {_label(m)} | {_rate(r)} | {per} | {at} | {r['reward']:.3f} ({r['reward_sft']:.3f}) | "
                         f"{r['artefacts']['filler']:.2f} | {r['artefacts']['confident']:.2f} | {gap} | {acc} | "
                         f"{chosen} |")  # fmt: skip
        lines.append("")
    rest = [m for m in defaults if not any(m in f for f in tuned["rows"].values())]
    if rest:
        lines += ["At the defaults, same code and bases: " + "; ".join(
            f"{_label(m)} {_rate(defaults[m])}" for m in rest) + ".", ""]  # fmt: skip
    spaces = "; ".join(f"{m}: " + ", ".join(f"`{k}` {v}" for k, v in sp.items()) for m, sp in tuned["spaces"].items()
                       if any(m in f for f in tuned["rows"].values()))  # fmt: skip
    lines += [f"Spaces searched: {spaces}.", ""]
    if tuned.get("trials"):
        lines += selection_lines(tuned["trials"])
    curve = tuned.get("lam_curve", {})
    if len(curve) > 1:
        from raydora.reporting import plot_sweep

        points = sorted((float(lam), r) for lam, r in curve.items())
        plot_sweep({"DPO + DoRA": [(float(np.log10(lam)), r["win_rate"]) for lam, r in points]},
                   figures / "lam_winrate.png", "DoRA's strength and the win rate against SFT",
                   xlabel="log10 lambda (lr and beta at the config's values)", ylabel="win rate vs SFT")  # fmt: skip
        lines += ["**DoRA's strength at the default lr and beta** (`python -m bench.tuned --methods --lam-curve ...`):",
                  "", f"![lambda]({rel}/lam_winrate.png)", "",
                  "| lambda | win rate vs SFT [95% CI] | per seed | gold reward (SFT) | filler | confident |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for lam, r in points:
            per = ", ".join(f"{v:.2f}" for v in r["per_seed"].values())
            lines.append(f"| {lam:g} | {_rate(r)} | {per} | {r['reward']:.3f} ({r['reward_sft']:.3f}) | "
                         f"{r['artefacts']['filler']:.2f} | {r['artefacts']['confident']:.2f} |")  # fmt: skip
        lines.append("")
    return lines


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks of ``x``, ties sharing their mean rank (Spearman's convention)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="stable")
    ranks = np.empty(len(a))
    ranks[order] = np.arange(len(a), dtype=np.float64)
    for v in np.unique(a):
        tied = a == v
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` (nan when either is constant)."""
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


SELECTORS = ("accuracy", "logp_accuracy", "reward_win_rate")


def pick(trials: list[dict[str, Any]], select: str) -> dict[str, Any]:
    """The trial with the highest ``select`` metric; ties go to the higher log-prob accuracy (for the reward's win
    rate) or implicit-reward margin (otherwise), then to the first trial name: ``raydora tune``'s own rule."""
    other = "logp_accuracy" if select == "reward_win_rate" else "margin"
    ordered = sorted(trials, key=lambda t: t["trial"])
    return max(ordered, key=lambda t: (t[select], t[other]))


def selection_lines(trials: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Which validation metric predicts the win rate: per diagnosed search (every trial sampled and evaluated on the
    evaluation prompts, ``python -m bench.tuned --diagnose``), the win rate of the trial each metric picks, the best
    any trial reached, and each metric's rank correlation with the win rate over the trials."""
    lines = ["**Which validation metric to select on.** Every trial of these searches was also sampled and evaluated "
             "(`python -m bench.tuned --diagnose`; never used to select). Win rate against SFT of the trial each "
             "validation metric picks, of the best trial (chosen on the evaluation prompts themselves: the most any "
             "selection over this space could reach), and Spearman's rank correlation of each metric with the win "
             "rate over the trials (rho):", "",
             "| search | trials | by implicit-reward accuracy | by log-prob accuracy | by reward of validation "
             "samples | best trial |", "|---|---|---|---|---|---|"]  # fmt: skip
    for key, rows in trials.items():
        rows = [r for r in rows if "win_rate" in r]
        if not rows:
            continue
        win = [r["win_rate"] for r in rows]
        metrics = [m for m in ("accuracy", "logp_accuracy", "reward_win_rate") if all(m in r for r in rows)]
        by = {m: pick(rows, m)["win_rate"] for m in metrics}
        rho = {m: spearman([r[m] for r in rows], win) for m in metrics}
        cells = [f"{by[m]:.3f} (rho {rho[m]:+.2f})" if m in by else "" for m in SELECTORS]
        lines.append(f"| {key} | {len(rows)} | " + " | ".join(cells) + f" | {max(win):.3f} |")
    return [*lines, ""]


def write_results(
    results: dict[str, Any],
    md: Path,
    figures: Path,
    discussion: Path | None = None,
    tuned: dict[str, Any] | None = None,
) -> None:
    """``docs/results.md`` with its tables and PNG plots (in ``figures``), from ``bench/results/experiments.json``
    (and the tuned rows of ``bench/results/tuned.json``, when given)."""
    from raydora.config import load_config
    from raydora.reporting import plot_sweep, plot_win_rates

    figures.mkdir(parents=True, exist_ok=True)
    cfg = load_config(results["config"], results["overrides"])
    main = results["noise"].get("n00", {})
    rel = os.path.relpath(figures, md.parent)
    seeds = ", ".join(str(s) for s in results["seeds"])
    lines = [
        "# Results: every method on the offline shift benchmark",
        "",
        "Generated by `make results` (`python -m bench.experiments`, then `python -m bench.experiments "
        "--report-only` to redo this page from `bench/results/experiments.json`). Do not edit by hand: the "
        "discussion at the end comes from `bench/results_discussion.md`.",
        "",
        "## Setup",
        f"- Benchmark (`raydora.synth`, config `{os.path.relpath(results['config'], ROOT)}`): {cfg.synth.rows} "
        f"training prompts with K = {cfg.synth.k} responses, golden share {cfg.synth.alpha}, synthetic shares "
        f"{cfg.synth.source_shares}; synthetic responses ranked by the biased labeller (length and confidence "
        f"bonus), golden ones by gold. {cfg.evaluate.prompts} held-out prompts x {cfg.generate.n} samples "
        f"(temperature {cfg.generate.temperature}, {cfg.generate.max_new_tokens} new tokens).",
        f"- Policy: `{cfg.model.policy}` built from its config, SFT warm start on {cfg.synth.sft_rows} "
        f"mixture responses ({cfg.sft.epochs} epochs), then {cfg.train.epochs} epochs of preference training "
        f"(batch {cfg.train.batch_size}, lr {cfg.train.lr}, beta {cfg.train.beta}, {cfg.train.num_workers} Ray "
        f"Train workers, fp32). Defaults of every robust objective from the config: lam {cfg.train.lam}, tau "
        f"{cfg.train.tau}, rho {cfg.train.rho}, beta' {cfg.train.beta_prime}, rDPO flip rate max(0.1, noise/2).",
        f"- Seeds {seeds}: a seed redraws the benchmark, the SFT model, the classifiers, the data order and the "
        "samples. The win rate is gold reward (alpha 0.8) win + tie/2 against the SFT policy's samples on the "
        "same prompts (0.5 = no change); the 95% CI is a two-level bootstrap (seeds, then prompts).",
        "- Pairwise methods train DPO on each row's best-vs-worst pair; listwise ones use all K responses. The "
        "oracle trains DPO (ERM) on the same rows ranked by gold: the upper bound.",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in findings(results)],
        "",
        *(tuned_lines(tuned, figures, rel) if tuned else []),
    ]
    if main:
        plot_win_rates([(LABELS[m], r) for m, r in main.items()], figures / "winrate_methods.png",
                       "Win rate against the SFT policy (label noise 0)")  # fmt: skip
        lines += ["## Method matrix (label noise 0)", "", f"![win rates]({rel}/winrate_methods.png)", "",
                  "| method | win rate vs SFT [95% CI] | per seed | gold reward (SFT) | filler | confident |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in main.items():
            per = ", ".join(f"{v:.2f}" for v in r["per_seed"].values())
            lines.append(f"| {LABELS[m]} | {_rate(r)} | {per} | {r['reward']:.3f} ({r['reward_sft']:.3f}) | "
                         f"{r['artefacts']['filler']:.2f} | {r['artefacts']['confident']:.2f} |")  # fmt: skip
        lines += ["", "filler and confident: the share of the policy's samples showing the verbose and the sloppy "
                  "source's artefact.", ""]  # fmt: skip
    noisy = {t: rows for t, rows in results["noise"].items()}
    methods = [m for m in METHODS if any(m in rows for t, rows in noisy.items() if t != "n00")]
    if methods:
        tags = list(noisy)
        series = {LABELS[m]: [(int(t[1:]) / 100, noisy[t][m]["win_rate"]) for t in tags if m in noisy[t]]
                  for m in methods}  # fmt: skip
        plot_sweep(series, figures / "winrate_noise.png", "Win rate against SFT under label noise",
                   xlabel="label noise (share of rows with shuffled scores)", ylabel="win rate vs SFT")  # fmt: skip
        lines += ["## Label-noise sweep", "", f"![noise]({rel}/winrate_noise.png)", "",
                  "| method | " + " | ".join(f"noise {int(t[1:])}%" for t in tags) + " |",
                  "|---|" + "---|" * len(tags)]  # fmt: skip
        for m in methods:
            cells = [(_rate(noisy[t][m]) if m in noisy[t] else "") for t in tags]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")
    sweep = [m for m in SWEEP_METHODS if m in main]
    if sweep:
        alphas = [x["alpha"] for x in main[sweep[0]]["sweep"]]
        plot_sweep({LABELS[m]: [(x["alpha"], x["win_rate"]) for x in main[m]["sweep"]] for m in sweep},
                   figures / "alpha_winrate.png", "Win rate against SFT under the alpha shift",
                   ylabel="win rate vs SFT")  # fmt: skip
        rewards = {LABELS[m]: [(x["alpha"], x["reward"]) for x in main[m]["sweep"]] for m in sweep}
        rewards["SFT policy"] = [(x["alpha"], x["reward_sft"]) for x in main[sweep[0]]["sweep"]]
        plot_sweep(rewards, figures / "alpha_reward.png", "Gold reward under the alpha shift")
        lines += ["## Evaluation-alpha sweep (the second shift; trained at alpha 0.8)", "",
                  f"![alpha win rate]({rel}/alpha_winrate.png) ![alpha reward]({rel}/alpha_reward.png)", "",
                  "Win rate against SFT (mean gold reward) at each evaluation alpha, label noise 0:", "",
                  "| method | " + " | ".join(f"alpha {a:.2f}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]  # fmt: skip
        for m in sweep:
            cells = [f"{x['win_rate']:.3f} ({x['reward']:.3f})" for x in main[m]["sweep"]]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        sft = [f"({x['reward_sft']:.3f})" for x in main[sweep[0]]["sweep"]]
        lines += ["| SFT policy | " + " | ".join(sft) + " |", ""]
    if results.get("dora_pair_weights"):
        lines += ["## Where DoRA puts its weight (label noise 0)", "",
                  "Each row's best-vs-worst pair by its sources (chosen > rejected under the biased labels): the "
                  "share of rows, and the share of the summed DoRA row weight h~, averaged over the seeds. A share "
                  "of weight above the share of rows means DoRA up-weights those pairs.", "",
                  "| pair (chosen > rejected) | rows | DoRA weight |", "|---|---|---|"]  # fmt: skip
        for k, v in results["dora_pair_weights"].items():
            lines.append(f"| {k} | {v['rows']:.3f} | {v['weight']:.3f} |")
        lines.append("")
    if results.get("seconds"):
        total = sum(results["seconds"].values())
        per_run = float(np.median([v for k, v in results["seconds"].items() if not k.startswith("base")]))
        lines += ["## Cost", "", f"{len(results['seconds'])} timed steps, {total / 60:.0f} min, on this 2-core CPU "
                  f"machine; a method's run (train, generate, evaluate) takes {per_run:.0f} s (median), a base "
                  "(synth, classify, SFT, reference, SFT samples) about 3.5 min at noise 0 and 1 min at other "
                  "noise levels. An interrupted matrix resumes, and runs finished by an earlier invocation are "
                  "not timed again, so the total can cover part of the matrix. Per-step seconds are in "
                  "`bench/results/experiments.json`.", ""]  # fmt: skip
    if discussion is not None and discussion.exists():
        lines += [discussion.read_text().rstrip(), ""]
    md.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "configs" / "experiments_cpu.yaml"))
    ap.add_argument("--root", default=str(ROOT / "runs" / "experiments"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2, 0.4, 0.6])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--noise-methods", nargs="+", default=list(NOISE_METHODS), choices=list(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "experiments.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "results.md"), help="the page to write ('' for none)")
    ap.add_argument("--tuned", default=str(ROOT / "bench" / "results" / "tuned.json"),
                    help="the tuned rows (python -m bench.tuned) shown on the page, when the file exists")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="aggregate the finished runs; train nothing")
    ap.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. train.lr=1e-4")
    args = ap.parse_args(argv)
    root = Path(args.root).absolute()
    from raydora.config import load_config

    alphas = tuple(load_config(args.config, args.overrides).evaluate.alphas)
    plan = [(s, n, m) for n in args.noise for s in args.seeds
            for m in (args.methods if n == 0 else [m for m in args.noise_methods if m != "oracle"])]  # fmt: skip
    timing: dict[str, float] = {}
    failed: dict[str, str] = {}
    if not args.report_only:
        for noise in args.noise:  # the whole noise-0 matrix first: it holds the headline results
            for seed in args.seeds:
                if not any(s == seed and n == noise for s, n, _ in plan):
                    continue
                t0 = time.perf_counter()
                noise0 = root / f"s{seed}-{_tag(0.0)}" / "base" if noise else None
                if noise0 is not None and not (noise0 / "sft" / "_SUCCESS").exists():
                    run_base(base_config(args.config, root, seed, 0.0, args.overrides), None)
                run_base(base_config(args.config, root, seed, noise, args.overrides), noise0)
                timing[f"base s{seed} {_tag(noise)}"] = round(time.perf_counter() - t0, 1)
                for s, n, m in plan:
                    if s == seed and n == noise:
                        t0 = time.perf_counter()
                        try:
                            run_method(args.config, root, s, n, m, args.overrides)
                        except Exception as e:  # noqa: BLE001 (one failed run must not lose the matrix)
                            failed[f"s{s} {_tag(n)} {m}"] = f"{type(e).__name__}: {e}"
                            print(f"[experiments] s{s} {_tag(n)} {m} FAILED: {e}", flush=True)
                            continue
                        timing[f"s{s} {_tag(n)} {m}"] = round(time.perf_counter() - t0, 1)
                        print(f"[experiments] s{s} {_tag(n)} {m}: {timing[f's{s} {_tag(n)} {m}']} s", flush=True)
    if args.report_only and Path(args.out).exists():
        # The page from the recorded results: runs/ may hold only some of the matrix (or none of it) by now.
        results: dict[str, Any] = json.loads(Path(args.out).read_text())
    else:
        results = {"config": args.config, "overrides": args.overrides, "seeds": args.seeds,
                   "alphas": list(alphas), "noise": {}, "failed": failed}  # fmt: skip
        bases = [root / f"s{s}-{_tag(0.0)}" / "base" for s in args.seeds]
        pair_weights = [dora_pair_weights(b) for b in bases if (b / "scored" / "_SUCCESS").exists()]
        if pair_weights:
            kinds = sorted({k for pw in pair_weights for k in pw})
            results["dora_pair_weights"] = {
                k: {x: float(np.mean([pw.get(k, {}).get(x, 0.0) for pw in pair_weights])) for x in ("rows", "weight")}
                for k in kinds
            }
        for noise in args.noise:
            rows = {}
            for m in {m for s, n, m in plan if n == noise}:
                runs = {s: root / f"s{s}-{_tag(noise)}" / m.replace("+", "_") for s in args.seeds}
                runs = {s: p for s, p in runs.items() if (p / "eval" / "_SUCCESS").exists()}
                if runs:
                    rows[m] = summarise(runs, alphas)
            results["noise"][_tag(noise)] = {m: rows[m] for m in METHODS if m in rows}
        previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
        # Seconds of the runs that ran now, over those of earlier invocations (a resumed matrix skips finished runs).
        seconds = {**previous.get("seconds", {}), **{k: v for k, v in timing.items() if v > 1}}
        if seconds:
            results["seconds"] = seconds
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    if args.docs:
        tuned = Path(args.tuned)
        write_results(
            results,
            Path(args.docs),
            Path(args.docs).parent / "results",
            ROOT / "bench" / "results_discussion.md",
            json.loads(tuned.read_text()) if tuned.is_file() else None,
        )
    for tag, rows in results["noise"].items():
        print(f"\nlabel noise {tag}: win rate vs SFT (mean over seeds, 95% CI) | gold reward | filler | confident")
        for m, r in rows.items():
            print(
                f"  {m:12s} {r['win_rate']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['reward']:.3f} "
                f"(sft {r['reward_sft']:.3f}) | {r['artefacts']['filler']:.2f} | {r['artefacts']['confident']:.2f}"
            )


if __name__ == "__main__":
    main()
