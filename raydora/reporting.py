"""The evaluation report: the markdown page (win rates, breakdowns, the shift sweep, held-out accuracy), its
tables for the console, and the plots (``winrate.png``, ``reward_vs_alpha.png``). :mod:`raydora.evaluate`
computes the numbers; this renders them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def fmt_rate(w: dict[str, Any]) -> str:
    if w.get("win_rate") is None:
        return "n/a"
    lo, hi = w["ci95"]
    return f"{w['win_rate']:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_ci(m: dict[str, Any]) -> str:
    lo, hi = m["ci95"]
    return f"{m['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown(report: dict[str, Any], title: str = "Evaluation") -> str:
    """``report.md``: the headline win-rate table, then the breakdowns."""
    name = report["policy"]
    lines = [f"# {title}", ""]
    meta = report.get("run", {})
    if meta:
        lines += [", ".join(f"{k}: `{v}`" for k, v in meta.items()), ""]
    lines += [
        f"{report['prompts']} prompts x {report['samples_per_prompt']} samples; reward: {report['reward']}. "
        "Win rate = P(win) + P(tie)/2 over all (policy sample, reference) pairs per prompt, averaged over "
        "prompts; 95% percentile-bootstrap interval over prompts.",
        "",
    ]
    lines += [
        f"## Win rate of `{name}` against each reference",
        "",
        "| reference | win rate [95% CI] | win | tie | lose | mean reward (reference) |",
        "|---|---|---|---|---|---|",
    ]
    for ref, w in report["win_rates"].items():
        if w.get("win_rate") is None:
            continue
        mr = report["mean_reward"].get(ref)
        lines.append(
            f"| {ref} | {fmt_rate(w)} | {w['win']:.3f} | {w['tie']:.3f} | {w['lose']:.3f} | "
            f"{'n/a' if mr is None else f'{mr:.3f}'} |"
        )
    if name in report["mean_reward"]:
        lines += ["", f"Mean reward of `{name}`: {report['mean_reward'][name]:.3f}", ""]
    else:
        lines += ["", "No reward (evaluate.reward=none): no generation win rates; samples in generations/.", ""]
    if report.get("heldout"):
        h = report["heldout"]
        lines += [
            f"## Held-out preference pairs ({h['pairs']} pairs, beta={h['beta']})",
            "",
            "Implicit reward r = beta * (log pi - log pi_ref) of the chosen (best-scored) against the rejected "
            "(worst-scored) response; accuracy = share of pairs with r(chosen) > r(rejected) (TRL's "
            "`rewards/accuracies`); the reference is the initial (SFT) policy, so its own implicit reward is 0. "
            "Log-prob accuracy: share with log pi(chosen) > log pi(rejected). 95% bootstrap intervals over "
            "pairs.",
            "",
            "| policy | implicit-reward accuracy | mean margin | log-prob accuracy |",
            "|---|---|---|---|",
        ]
        for k, m in h["policies"].items():
            lines.append(f"| {k} | {_fmt_ci(m['accuracy'])} | {_fmt_ci(m['margin'])} | {_fmt_ci(m['logp_accuracy'])} |")
        lines.append("")
    if report.get("by_task"):
        lines += [
            "## Win rate against the SFT policy, by task",
            "",
            "| task | prompts | win rate [95% CI] |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {w['prompts']} | {fmt_rate(w)} |" for t, w in report["by_task"].items()]
        lines.append("")
    if report.get("artefacts"):
        keys = sorted({k for v in report["artefacts"].values() for k in v})
        lines += [
            "## Artefacts in the samples (share of samples)",
            "",
            "| policy | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        lines += [f"| {p} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for p, v in report["artefacts"].items()]
        lines.append("")
    if report.get("sweep"):
        names = list(report["sweep"][0]["mean_reward"])
        lines += [
            "## Shift sweep: gold = alpha * correctness + (1 - alpha) * conciseness",
            "",
            "| alpha | " + " | ".join(f"reward {k}" for k in names) + " | win rate vs sft [95% CI] |",
            "|---|" + "---|" * (len(names) + 1),
        ]
        for row in report["sweep"]:
            vals = " | ".join(f"{row['mean_reward'][k]:.3f}" for k in names)
            lines.append(f"| {row['alpha']:.2f} | {vals} | {fmt_rate(row.get('vs_sft', {}))} |")
        lines.append("")
    return "\n".join(lines)


def plot_win_rates(rows: list[tuple[str, dict[str, Any]]], path: Path, title: str) -> None:
    """Horizontal bars of win rates with their 95% intervals; a dashed line at 0.5 (parity)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, w) for k, w in rows if w.get("win_rate") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(rows) + 1.4))
    y = np.arange(len(rows))
    rates = np.array([w["win_rate"] for _, w in rows])
    lo = rates - np.array([w["ci95"][0] for _, w in rows])
    hi = np.array([w["ci95"][1] for _, w in rows]) - rates
    ax.barh(y, rates, xerr=[lo, hi], capsize=4, color="#4C72B0")
    ax.axvline(0.5, ls="--", color="grey", lw=1)
    ax.set_yticks(y, [k for k, _ in rows])
    ax.set_xlim(0, 1)
    ax.set_xlabel("win rate (95% bootstrap CI)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    title: str,
    xlabel: str = "alpha (weight of correctness in the gold reward)",
    ylabel: str = "mean gold reward",
) -> None:
    """One line per series (by default: mean gold reward against alpha)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path, title: str = "Evaluation") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report, title) + "\n")
    if report["win_rates"]:
        plot_win_rates(list(report["win_rates"].items()), out / "winrate.png", f"{report['policy']} vs references")
    if report.get("sweep"):
        names = list(report["sweep"][0]["mean_reward"])
        series = {k: [(r["alpha"], r["mean_reward"][k]) for r in report["sweep"]] for k in names}
        plot_sweep(series, out / "reward_vs_alpha.png", "Gold reward under the alpha shift")


def heldout_table(report: dict[str, Any]) -> str:
    """The held-out pairs' metrics as printed by the CLI ('' when the run has none)."""
    h = report.get("heldout")
    if not h:
        return ""
    rows = [
        f"held-out preference pairs ({h['pairs']}): implicit-reward accuracy, mean margin, log-prob accuracy [95% CI]:"
    ]
    for k, m in h["policies"].items():
        rows.append(f"  {k:<10} {_fmt_ci(m['accuracy']):<24} {_fmt_ci(m['margin']):<26} {_fmt_ci(m['logp_accuracy'])}")
    return "\n".join(rows)


def win_table(report: dict[str, Any]) -> str:
    """The headline table printed by the CLI and ``make demo``."""
    name = report["policy"]
    if not report["win_rates"]:
        return (
            f"{report['prompts']} prompts x {report['samples_per_prompt']} samples of {name} in generations/; "
            f"no generation win rates (evaluate.reward={report['reward']}: give a reward model folder for them)"
        )
    rows = [
        f"win rate of {name} ({report['prompts']} prompts x {report['samples_per_prompt']} samples, "
        f"reward {report['reward']}):"
    ]
    rows.append(f"  {'reference':<10} {'win rate [95% CI]':<26} {'win':>6} {'tie':>6} {'lose':>6}")
    for ref, w in report["win_rates"].items():
        if w.get("win_rate") is not None:
            rows.append(f"  {ref:<10} {fmt_rate(w):<26} {w['win']:>6.3f} {w['tie']:>6.3f} {w['lose']:>6.3f}")
    sft = report["win_rates"].get("sft", {})
    if sft.get("win_rate") is not None:
        rows.append(f"{name} {verdict(sft)} its SFT start")
    return "\n".join(rows)


def verdict(w: dict[str, Any]) -> str:
    """What a win rate's 95% interval says against 0.5 (parity): ``beats`` (above it), ``loses to`` (below it), or
    ``is not distinguishable from`` (it holds 0.5)."""
    lo, hi = w["ci95"]
    if lo > 0.5:
        return "beats (95% CI above 0.5)"
    if hi < 0.5:
        return "loses to (95% CI below 0.5)"
    return "is not distinguishable from (95% CI holds 0.5)"
