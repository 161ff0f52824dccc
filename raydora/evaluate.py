"""Evaluation: rewards of generated samples, win rates against reference responses with bootstrap confidence
intervals, per-source and per-task breakdowns, the shift sweep, and a report with plots (:mod:`raydora.reporting`).

**Rewards** (:mod:`raydora.rewards`). ``evaluate.reward=gold`` scores the benchmark's prompts with its
programmatic gold reward (:func:`raydora.synth.gold_reward`, at the training labels' ``ALPHA0`` for the headline
numbers). Otherwise it is a local folder: a raydora classifier (it holds ``calibration.json``; the reward is its
calibrated ``p_golden``) or a reward model (``*ForSequenceClassification`` with one logit; the reward is that
logit). Model rewards run on a Ray Data actor pool.

**Win rates.** For each prompt, every policy sample is compared with every reference response of a set (the SFT
policy's samples for the same prompt, or one source's responses): a win when its reward is higher by more than
``tie_tolerance``, a tie within it. The prompt's score is ``P(win) + P(tie) / 2`` over those pairs, and the win
rate is the mean over prompts. The 95% interval is a percentile bootstrap over prompts (samples of one prompt
stay together), seeded, so reruns agree.

**References.** ``sft``: the initial policy's samples (``generations/sft``), drawn with the same seeds. ``sources``:
on the benchmark, fresh responses of each source (``golden``, ``verbose``, ``sloppy``) to the held-out prompts,
``n`` per prompt; on real data, the prompt file's ``responses`` grouped by their ``sources``.

**Shift sweep** (gold reward only): the mean reward and the win rate against the SFT policy at each ``alpha`` of
``evaluate.alphas``, where ``gold = alpha * correctness + (1 - alpha) * conciseness`` (the second shift of WDPO).

Outputs in ``eval/``: ``report.json``, ``report.md``, ``winrate.png`` and ``reward_vs_alpha.png``.
:func:`compare` (``raydora report RUN_DIR...``) puts several runs' reports in one table and one pair of plots.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raydora.cluster import resolve_device
from raydora.config import RunConfig
from raydora.reporting import fmt_rate, heldout_table, plot_sweep, plot_win_rates, win_table, write_report
from raydora.rewards import Reward, model_reward, pointwise
from raydora.rundir import (
    StageResult,
    file_fingerprints,
    fingerprint,
    is_done,
    promote,
    read_success,
    staging,
    write_success,
)


# ---- statistics -------------------------------------------------------------------------------------------------
def outcomes(policy: Sequence[float], reference: Sequence[float], tol: float = 1e-6) -> tuple[float, float, float]:
    """``(P(win), P(tie), P(lose))`` of the policy's rewards against a reference set's, over all pairs."""
    a = np.asarray(policy, dtype=np.float64)[:, None]
    b = np.asarray(reference, dtype=np.float64)[None, :]
    if a.size == 0 or b.size == 0:
        return float("nan"), float("nan"), float("nan")
    win, lose = float(np.mean(a > b + tol)), float(np.mean(a < b - tol))
    return win, 1.0 - win - lose, lose


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> list[float]:
    """Percentile bootstrap interval of the mean of ``values`` (one value per prompt)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def win_rate(
    policy: Sequence[Sequence[float]], reference: Sequence[Sequence[float]], tol: float, resamples: int, seed: int
) -> dict[str, Any]:
    """Win / tie / lose rates, the win rate ``win + tie / 2`` and its 95% bootstrap interval, over prompts: row
    ``i`` of ``policy`` and ``reference`` hold prompt ``i``'s rewards (prompts with no reference are skipped)."""
    per = np.array([outcomes(a, b, tol) for a, b in zip(policy, reference, strict=True) if len(b) and len(a)])
    if per.size == 0:
        return {"prompts": 0, "win": None, "tie": None, "lose": None, "win_rate": None, "ci95": [None, None]}
    score = per[:, 0] + per[:, 1] / 2
    win, tie, lose = per.mean(axis=0)
    return {
        "prompts": len(per),
        "win": float(win),
        "tie": float(tie),
        "lose": float(lose),
        "win_rate": float(score.mean()),
        "ci95": bootstrap_ci(score, resamples, seed),
    }


# ---- references -------------------------------------------------------------------------------------------------
def benchmark_sources(prompts: pa.Table, n: int, seed: int) -> dict[str, list[list[str]]]:
    """``n`` fresh responses of each benchmark source to each prompt, seeded by (seed, prompt id, source)."""
    from raydora import synth

    out: dict[str, list[list[str]]] = {s: [] for s in synth.SOURCES}
    for row_id, prompt in zip(prompts.column("id").to_pylist(), prompts.column("prompt").to_pylist(), strict=True):
        for name, make in synth.SOURCES.items():
            rng = random.Random(f"raydora-eval-ref-{seed}-{row_id}-{name}")
            out[name].append([make(prompt, rng) for _ in range(n)])
    return out


def data_sources(prompts: pa.Table) -> dict[str, list[list[str]]]:
    """The prompt file's own ``responses`` grouped by ``sources`` (``unknown`` when the column is missing), and, for
    preference rows (a ``scores`` column, as ``heldout/``), ``chosen``: each row's best-scored response."""
    if "responses" not in prompts.column_names:
        return {}
    responses = prompts.column("responses").to_pylist()
    sources = prompts.column("sources").to_pylist() if "sources" in prompts.column_names else None
    names = sorted({s for row in (sources or [["unknown"]]) for s in (row or [])})
    out: dict[str, list[list[str]]] = {s: [] for s in names}
    for i, rs in enumerate(responses):
        tags = (sources[i] if sources else None) or ["unknown"] * len(rs or [])
        for s in names:
            out[s].append([r for r, t in zip(rs or [], tags, strict=False) if t == s])
    if "scores" in prompts.column_names and "chosen" not in out:  # preference rows: their best response too
        best = []
        for rs, sc in zip(responses, prompts.column("scores").to_pylist(), strict=True):
            best.append([rs[int(np.argmax(sc))]] if rs and sc and len(sc) == len(rs) else [])
        out["chosen"] = best
    return out


def _is_benchmark(prompts: pa.Table) -> bool:
    from raydora import synth

    try:
        for p in prompts.column("prompt").to_pylist():
            synth.parse_prompt(p)
    except ValueError:
        return False
    return True


# ---- the report ---------------------------------------------------------------------------------------------------
def _score_sets(reward: Reward, prompts: list[str], sets: dict[str, list[list[str]]]) -> dict[str, list[list[float]]]:
    """Rewards of every response of every set, in one call to ``reward`` (one Ray Data pass for model rewards)."""
    flat_p, flat_r, index = [], [], []
    for name, rows in sets.items():
        for i, responses in enumerate(rows):
            for r in responses:
                flat_p.append(prompts[i])
                flat_r.append(r)
                index.append((name, i))
    values = reward(flat_p, flat_r) if flat_p else np.zeros(0)
    out: dict[str, list[list[float]]] = {name: [[] for _ in rows] for name, rows in sets.items()}
    for (name, i), v in zip(index, values, strict=True):
        out[name][i].append(float(v))
    return out


def _mix(
    correct: dict[str, list[list[float]]], concise: dict[str, list[list[float]]], alpha: float
) -> dict[str, list[list[float]]]:
    """The gold reward ``alpha * correctness + (1 - alpha) * conciseness`` of every scored response (the same
    expression as :func:`raydora.synth.gold_reward`, so the values are identical)."""
    return {
        k: [
            [alpha * c + (1 - alpha) * q for c, q in zip(cs, qs, strict=True)]
            for cs, qs in zip(correct[k], concise[k], strict=True)
        ]
        for k in correct
    }


def _mean(rows: list[list[float]]) -> float | None:
    flat = [x for r in rows for x in r]
    return float(np.mean(flat)) if flat else None


def build_report(
    prompts: pa.Table,
    generations: dict[str, pa.Table],
    reward: Reward | str,
    *,
    references: Sequence[str] = ("sft", "sources"),
    alphas: Sequence[float] = (),
    bootstrap: int = 1000,
    tie_tolerance: float = 1e-6,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation of ``generations["policy"]`` (or ``["sft"]`` alone) on ``prompts``, as a JSON-ready dict.

    ``generations`` maps a policy name to its generation table; each is aligned to ``prompts`` by ``id``."""
    from raydora import synth

    order = prompts.column("id").to_pylist()
    name = "policy" if "policy" in generations else "sft"
    samples: dict[str, list[list[str]]] = {}
    for key, table in generations.items():
        by_id = dict(zip(table.column("id").to_pylist(), table.column("generations").to_pylist(), strict=True))
        missing = [i for i in order if i not in by_id]
        if missing:
            raise ValueError(
                f"generations of {key!r} lack {len(missing)} prompts (e.g. id {missing[0]!r}): the prompts or "
                "evaluate.prompts changed since they were made; run the generate stage again"
            )
        samples[key] = [list(by_id[i]) for i in order]
    n = max(len(s) for s in samples[name]) if samples[name] else 1
    benchmark = _is_benchmark(prompts)
    if reward == "gold" and not benchmark:
        raise ValueError(
            "evaluate.reward=gold needs the benchmark's prompts; give a reward model folder, or evaluate.reward=none "
            "(the held-out implicit-reward accuracy is reported without a reward)"
        )
    if reward == "none":
        return {
            "policy": name,
            "reward": "none",
            "prompts": len(order),
            "samples_per_prompt": n,
            "mean_reward": {},
            "win_rates": {},
        }
    sets = dict(samples)
    if "sources" in references:
        sets.update(benchmark_sources(prompts, n, seed) if benchmark else data_sources(prompts))
    text = prompts.column("prompt").to_pylist()
    if reward == "gold":
        # The two gold objectives are scored once; every alpha (the headline ALPHA0 and the sweep) mixes them.
        correct = _score_sets(pointwise(synth.correctness), text, sets)
        concise = _score_sets(pointwise(synth.conciseness), text, sets)
        scored = _mix(correct, concise, synth.ALPHA0)
    else:
        assert callable(reward)
        scored = _score_sets(reward, text, sets)
    refs = [k for k in sets if k != name and (k != "sft" or "sft" in references)]
    args: dict[str, Any] = {"tol": tie_tolerance, "resamples": bootstrap, "seed": seed}
    report: dict[str, Any] = {
        "policy": name,
        "reward": reward if isinstance(reward, str) else "model",
        "prompts": len(order),
        "samples_per_prompt": n,
        "mean_reward": {k: _mean(v) for k, v in scored.items()},
        "win_rates": {k: win_rate(scored[name], scored[k], **args) for k in refs},
    }
    if "task" in prompts.column_names and "sft" in refs:
        tasks = prompts.column("task").to_pylist()

        def of_task(rows: list[list[float]], t: str) -> list[list[float]]:
            return [x for x, tt in zip(rows, tasks, strict=True) if tt == t]

        report["by_task"] = {
            t: win_rate(of_task(scored[name], t), of_task(scored["sft"], t), **args) for t in set(tasks)
        }
        report["by_task"] = dict(sorted(report["by_task"].items()))
    if benchmark:
        report["artefacts"] = {k: synth.artefact_rates([x for r in samples[k] for x in r]) for k in samples}
    if reward == "gold" and alphas:
        sweep = []
        for a in alphas:
            at = _mix(correct, concise, a)
            row: dict[str, Any] = {"alpha": float(a), "mean_reward": {k: _mean(v) for k, v in at.items()}}
            if "sft" in refs:
                row["vs_sft"] = win_rate(at[name], at["sft"], **args)
            sweep.append(row)
        report["sweep"] = sweep
    return report


# ---- held-out preference pairs -------------------------------------------------------------------------------------
def _mean_ci(values: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    return {"mean": float(values.mean()), "ci95": bootstrap_ci(values, resamples, seed)}


def preference_metrics(
    policy: np.ndarray, reference: np.ndarray, beta: float, resamples: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Held-out pair metrics from sequence log-probs ``[n, 2]`` (chosen, rejected) of a policy and the reference:
    the implicit reward ``beta * (log pi - log pi_ref)``'s accuracy (``r_c > r_r``, TRL's ``rewards/accuracies``) and
    mean margin, and the log-prob accuracy (``log pi_c > log pi_r``), each with a 95% bootstrap interval."""
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    logp = policy[:, 0] - policy[:, 1]
    return {
        "accuracy": _mean_ci((margin > 0).astype(np.float64), resamples, seed),
        "margin": _mean_ci(margin, resamples, seed),
        "logp_accuracy": _mean_ci((logp > 0).astype(np.float64), resamples, seed),
    }


def heldout_logps(cfg: Any, run_dir: Path, name: str, model: Path, rows: Path | None = None) -> np.ndarray:
    """``[n, 2]`` log-probs of ``model`` for the chosen (best-scored) and rejected (worst-scored) response of every
    held-out row (``rows``: another validated folder, e.g. ``raydora tune``'s validation pairs), through the
    reference pass (same tokens as training), cached in ``eval_logps/<name>/``."""
    return heldout_logps_of(cfg, run_dir, {name: model}, rows)[name]


def heldout_logps_of(
    cfg: Any, run_dir: Path, models: dict[str, Path], rows: Path | None = None
) -> dict[str, np.ndarray]:
    """:func:`heldout_logps` of several models (``{name: folder}``), each cached in ``eval_logps/<name>/`` with its
    own fingerprint (a rerun skips the models whose cache is valid). The models to compute share one reference pass
    on CPU (one actor pool, each actor holding them all: the actors' start-up is most of a small pass's time); on a
    GPU each model gets its own pass, so an actor holds one model's weights."""
    import pyarrow.parquet as pq

    from raydora.encoding import pair_indices
    from raydora.reference import attn_implementation, tokenizer_dir

    heldout, tok = Path(rows) if rows is not None else run_dir / "heldout", tokenizer_dir(cfg, run_dir)
    fps = {
        name: fingerprint(
            "heldout_logps",
            (read_success(heldout) or {}).get("fingerprint"),
            file_fingerprints(model),
            file_fingerprints(tok),
            cfg.model.max_length,
            cfg.model.max_prompt_length,
            cfg.model.precision,
        )
        for name, model in models.items()
    }
    todo = [n for n in models if not is_done(run_dir / "eval_logps" / n, fps[n])]
    gpu = resolve_device(cfg.reference.device, here=cfg.reference.actors == 0) == "cuda"
    for group in [[n] for n in todo] if gpu else [todo] if todo else []:
        kwargs = {
            "model_dir": models[group[0]],
            "more_models": tuple(models[n] for n in group[1:]),
            "tokenizer": tok,
            "max_length": cfg.model.max_length,
            "cfg": cfg.reference,
            "stage": f"heldout_{'+'.join(group)}",
            "precision": cfg.model.precision,
            "attn": attn_implementation(cfg),
            "pad_to_multiple_of": cfg.model.pad_to_multiple_of,
            "max_prompt_length": cfg.model.max_prompt_length,
            "logprob_chunk": cfg.model.logprob_chunk,
        }
        _heldout_pass(heldout, run_dir / "eval_logps", group, fps, kwargs)
    out = {}
    for name in models:
        files = sorted((run_dir / "eval_logps" / name).glob("*.parquet"))
        table = pa.concat_tables([pq.read_table(f, columns=["scores", "reference_logps"]) for f in files])
        idx = pair_indices(table.column("scores").to_pylist())
        logps = table.column("reference_logps").to_pylist()
        out[name] = np.array([[r[i], r[j]] for r, (i, j) in zip(logps, idx, strict=True)], dtype=np.float64)
    return out


def _heldout_pass(heldout: Path, folder: Path, names: list[str], fps: dict[str, str], kwargs: dict[str, Any]) -> None:
    """One reference pass of ``heldout`` through the models of ``names`` into ``folder/<name>/`` each (its rows
    with that model's ``reference_logps``, a ``_SUCCESS`` marker with its fingerprint), each promoted atomically."""
    import pyarrow.parquet as pq

    from raydora.reference import encode_rows

    if len(names) == 1:
        encode_rows(heldout, folder / names[0], fp=fps[names[0]], **kwargs)
        return
    with staging(folder, "heldout") as tmp:
        encode_rows(heldout, tmp / "all", fp=fingerprint(*(fps[n] for n in names)), **kwargs)
        marker = read_success(tmp / "all") or {}
        columns = ["reference_logps", *(f"reference_logps_{i}" for i in range(1, len(names)))]
        for name in names:
            (tmp / name).mkdir()
        for f in sorted((tmp / "all").glob("*.parquet")):  # each file read once, split into every model's folder
            table = pq.read_table(f)
            rest = table.drop_columns(columns)
            for column, name in zip(columns, names, strict=True):
                pq.write_table(rest.append_column("reference_logps", table.column(column)), tmp / name / f.name)
        for name in names:
            stage = f"heldout_{name}"
            rows = (marker.get("rows") or {}).get(kwargs["stage"], 0)
            write_success(
                tmp / name,
                {
                    "stage": stage,
                    "fingerprint": fps[name],
                    "rows": {stage: rows},
                    "truncated": marker.get("truncated", 0),
                },
            )
            promote(tmp / name, folder / name)


def heldout_report(cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """The held-out pairs' metrics (:func:`preference_metrics`) of the trained policy and the SFT (initial) policy,
    both against the reference (the initial policy); None when the run has no ``heldout/`` rows."""
    from raydora.reference import initial_policy, trained_policy

    marker = read_success(run_dir / "heldout")
    if marker is None or not marker.get("rows"):
        return None
    models = {"sft": initial_policy(cfg, run_dir)}
    trained = trained_policy(run_dir)
    if trained is not None:
        models = {"policy": trained, **models}
    logps = heldout_logps_of(cfg, run_dir, models)  # one pass for both (on CPU)
    e = cfg.evaluate
    policies = {k: preference_metrics(v, logps["sft"], cfg.train.beta, e.bootstrap, cfg.seed) for k, v in logps.items()}
    return {"pairs": len(logps["sft"]), "beta": cfg.train.beta, "policies": policies}


def resolve_reward(cfg: Any, prompts: pa.Table) -> str:
    """``evaluate.reward`` with ``auto`` resolved by the evaluation prompts: gold when they are the benchmark's
    (its eval split, also for runs whose training data is an oracle split or a loop round), none otherwise."""
    if cfg.evaluate.reward != "auto":
        return str(cfg.evaluate.reward)
    return "gold" if _is_benchmark(prompts) else "none"


# ---- the stage and the comparison -------------------------------------------------------------------------------
def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage ``evaluate``: the report of ``generations/`` into ``eval/``."""
    from raydora import generate as gen

    run_dir = Path(run_dir).absolute()
    folders = sorted(p for p in (run_dir / "generations").glob("*") if p.is_dir() and not p.name.startswith("."))
    markers = {p.name: read_success(p) for p in folders}
    if not any(markers.values()):
        raise FileNotFoundError(f"{run_dir / 'generations'}: no finished generations; run the generate stage first")
    e = cfg.evaluate
    prompts = gen.read_prompts(gen.prompt_source(cfg, run_dir), e.prompts)
    reward_name = resolve_reward(cfg, prompts)
    held = read_success(run_dir / "heldout")
    extra = [held.get("fingerprint"), cfg.train.beta, cfg.model.max_prompt_length] if held else []
    fp = fingerprint(
        "evaluate",
        {k: (v or {}).get("fingerprint") for k, v in markers.items()},
        reward_name,
        e.references,
        e.alphas,
        e.bootstrap,
        e.tie_tolerance,
        cfg.seed,
        *extra,
    )
    out = run_dir / "eval"
    if not force and is_done(out, fp):
        report = json.loads((out / "report.json").read_text())
        return StageResult(
            "evaluate",
            {"eval": str(out)},
            {"prompts": report["prompts"]},
            True,
            info={"table": win_table(report), "heldout": heldout_table(report)},
        )
    generations = {k: gen.read_generations(run_dir / "generations" / k) for k, m in markers.items() if m}
    reward: Reward | str = (
        reward_name if reward_name in ("gold", "none") else model_reward(reward_name, cfg.model.max_length)
    )
    report = build_report(
        prompts,
        generations,
        reward,
        references=e.references,
        alphas=e.alphas,
        bootstrap=e.bootstrap,
        tie_tolerance=e.tie_tolerance,
        seed=cfg.seed,
    )
    heldout = heldout_report(cfg, run_dir)
    if heldout is not None:
        report["heldout"] = heldout
    report["run"] = {"name": cfg.name, "loss": cfg.train.loss, "objective": cfg.train.objective}
    report["generation"] = {
        k: {x: (m or {}).get(x) for x in ("backend", "tokens_per_s", "sampling")} for k, m in markers.items()
    }
    with staging(run_dir, "eval") as tmp:
        write_report(report, tmp / "out", title=f"Evaluation of run `{cfg.name}`")
        write_success(tmp / "out", {"stage": "evaluate", "fingerprint": fp, "rows": {"prompts": report["prompts"]}})
        promote(tmp / "out", out)
    return StageResult(
        "evaluate",
        {"eval": str(out)},
        {"prompts": report["prompts"]},
        info={"table": win_table(report), "heldout": heldout_table(report)},
    )


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """One table (and plots, when ``out`` is given) comparing several runs' ``eval/report.json``."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "eval" / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run `raydora evaluate` for {d} first")
        report = json.loads(path.read_text())
        runs.append((Path(d).name, report))
    refs = sorted({r for _, rep in runs for r in rep["win_rates"]}, key=lambda r: (r != "sft", r))
    head = "| run | method | mean reward | " + " | ".join(f"vs {r} [95% CI]" for r in refs) + " |"
    lines = ["# Comparison", "", head, "|---|---|---|" + "---|" * len(refs)]
    for name, rep in runs:
        meta = rep.get("run", {})
        method = f"{meta.get('objective', '?')} / {meta.get('loss', '?')}"
        rates = " | ".join(fmt_rate(rep["win_rates"].get(r, {})) for r in refs)
        lines.append(f"| {name} | {method} | {rep['mean_reward'][rep['policy']]:.3f} | {rates} |")
    text = "\n".join(lines) + "\n"
    summary = {
        "runs": [
            {
                "name": n,
                **rep.get("run", {}),
                "mean_reward": rep["mean_reward"][rep["policy"]],
                "win_rates": rep["win_rates"],
            }
            for n, rep in runs
        ]
    }
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        (folder / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        if "sft" in refs:
            plot_win_rates(
                [(n, rep["win_rates"].get("sft", {})) for n, rep in runs],
                folder / "winrate.png",
                "win rate against the SFT policy",
            )
        series = {
            n: [(r["alpha"], r["mean_reward"][rep["policy"]]) for r in rep["sweep"]]
            for n, rep in runs
            if rep.get("sweep")
        }
        if series:
            plot_sweep(series, folder / "reward_vs_alpha.png", "policy gold reward under the alpha shift")
    return text, summary
