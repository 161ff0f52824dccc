"""The online loop: generate -> label -> train, repeated (``raydora loop``; docs/training.md).

Iterative preference optimisation in the style of online / iterative DPO, on the run's own stages. Round ``r``
starts from policy ``r-1`` (round 1: the run's ``train/final``, or its SFT / initial policy when it has not
trained) and, in its own run directory ``<run>/loop/round<r>/``:

1. **samples** ``loop.samples`` responses per training prompt (``loop.prompts`` rows of ``data/``, the next ones
   after round ``r-1``'s, wrapping; default all) from that policy, with the ``generate`` settings (vLLM or
   transformers, on an actor pool), seeded per round;
2. **labels** them with ``loop.reward`` (the benchmark's ``biased`` labeller, its ``gold`` reward, or a reward
   model folder) into canonical rows (:func:`to_preferences`) whose responses are the prompt's distinct samples,
   tagged ``policy-r<r>``, plus (``loop.keep_golden``; default on for DoRA and reweighting) the prompt's
   ``golden`` responses from ``data/`` labelled by the same reward, so that DoRA's classifier can tell golden from
   the policy's samples;
3. runs ``validate``, ``classify`` (objectives that read p_golden), ``reference``, ``train``, ``generate`` and
   ``evaluate`` on those rows with ``model.policy`` = policy ``r-1``: the reference model is the round's starting
   policy, and the evaluation's ``sft`` baseline is that policy too, so each round reports its win rate against
   the round before it.

With ``loop.live_generators`` (the default) every sampling runs on one pool of generator actors kept for the whole
loop (:class:`LiveGenerators`, :mod:`raydora.generators`): a round samples its prompts and its evaluation's
baseline with policy ``r-1``, trains, syncs the new policy into the actors once (through the object store, with a
version that every sampling call checks) and samples its evaluation's ``policy`` folder; the ``generate`` stage
then finds both folders up to date. Round ``r``'s baseline samples are round ``r-1``'s ``policy`` samples (the same
model, prompts and sampling): they are hard-linked into place, not sampled again (:func:`reuse_baseline`).

Every round is an ordinary run directory (each stage skips itself when up to date), so an interrupted loop resumes
where it stopped. ``<run>/loop/summary.json`` collects, per round, the rows, the prompts that carried no
preference, the mean reward of the starting policy's samples and the round's win rates.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydora.config import P_GOLDEN_OBJECTIVES, PAIRWISE_LOSSES, RunConfig, from_dict, to_dict
from raydora.rewards import Reward
from raydora.rundir import file_fingerprints, fingerprint, is_done, promote, read_success, staging, write_success

GOLDEN = "golden"


def source_tag(round_: int) -> str:
    """The source name of round ``round_``'s samples."""
    return f"policy-r{round_}"


def start_policy(cfg: RunConfig, run_dir: Path) -> Path:
    """Round 1's policy: the run's trained policy, else its initial (SFT or base) policy."""
    from raydora.reference import initial_policy, trained_policy

    return trained_policy(run_dir) or initial_policy(cfg, run_dir)


def round_config(cfg: RunConfig, run_dir: Path, round_: int, policy: Path) -> RunConfig:
    """The run config of round ``round_``: its labelled samples as the data, ``policy`` as the model (and so as
    the reference), no SFT; the held-out prompts of the run for evaluation."""
    from raydora.generate import prompt_source

    data = to_dict(cfg)
    data.update(root=str(run_dir / "loop"), name=f"round{round_}")
    data["model"].update(policy=str(policy), tokenizer=cfg.model.tokenizer)
    data["data"].update(input=str(run_dir / "loop" / f"round{round_}" / "input"), format="canonical")
    data["sft"].update(enabled=False)
    data["classifier"].update(source_shares=None)  # the round's own mixture: golden and the policy's samples
    data["generate"].update(prompts=str(prompt_source(cfg, run_dir)))
    return from_dict(data)


def keep_golden(cfg: RunConfig) -> bool:
    """``loop.keep_golden``, resolved: null means on for the objectives that read p_golden."""
    k = cfg.loop.keep_golden
    return cfg.train.objective in P_GOLDEN_OBJECTIVES if k is None else k


def round_prompts(prompts: pa.Table, round_: int, n: int | None) -> pa.Table:
    """Round ``round_``'s training prompts: all of them, or the ``n`` after round ``round_ - 1``'s, wrapping."""
    total = prompts.num_rows
    if n is None or n >= total:
        return prompts
    start = ((round_ - 1) * n) % total
    if start + n <= total:
        return prompts.slice(start, n)
    return pa.concat_tables([prompts.slice(start), prompts.slice(0, start + n - total)])


def to_preferences(
    generations: pa.Table,
    reward: Reward,
    source: str,
    *,
    dedupe: bool = True,
    extra: Mapping[str, Sequence[tuple[str, str]]] | None = None,
    sample_scores: list[float] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Canonical preference rows from sampled responses: ``responses`` are a prompt's distinct samples, ``scores``
    their rewards (``reward(prompts, responses)``, one batched call, as :data:`raydora.rewards.Reward`),
    ``sources`` the tag ``source``. Blank samples are left out (validation would reject the row).

    ``extra`` maps a prompt id to more ``(response, source)`` pairs that join its samples before labelling (the
    online loop adds the prompt's golden responses; one equal to a sample is not added twice). Prompts left with
    fewer than 2 distinct responses, or with all scores equal, carry no preference and are dropped; returns
    ``(rows, dropped)``. ``sample_scores``, when given, receives the reward of every sample, kept or dropped."""
    candidates = []
    for r in generations.select(["id", "prompt", "generations"]).to_pylist():
        samples = [g for g in r["generations"] if g and g.strip()]
        samples = list(dict.fromkeys(samples)) if dedupe else samples
        pairs, seen = [(g, source) for g in samples], set(samples)
        for g, s in (extra or {}).get(r["id"], ()):
            if g.strip() and g not in seen:
                pairs.append((g, s))
                seen.add(g)
        candidates.append((r, pairs, len(samples)))
    flat = [(r["prompt"], g) for r, pairs, _ in candidates for g, _ in pairs]
    values = [float(v) for v in reward([p for p, _ in flat], [g for _, g in flat])] if flat else []
    rows, dropped, at = [], 0, 0
    for r, pairs, n_samples in candidates:
        scores, at = values[at : at + len(pairs)], at + len(pairs)
        if sample_scores is not None:
            sample_scores.extend(scores[:n_samples])
        if len(pairs) < 2 or len(set(scores)) < 2:
            dropped += 1
            continue
        rows.append(
            {
                "id": f"{source}-{r['id']}",
                "prompt": r["prompt"],
                "responses": [g for g, _ in pairs],
                "scores": scores,
                "sources": [s for _, s in pairs],
            }
        )
    return rows, dropped


def label(
    samples: pa.Table, prompts: pa.Table, reward: Any, source: str, with_golden: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Canonical rows from one round's samples (:func:`to_preferences`): a prompt's distinct samples and,
    ``with_golden``, its golden responses from ``prompts``, all labelled by ``reward`` in one call. Returns the rows
    and their counts (``rows + dropped == prompts``; the samples' mean reward is over every sample)."""
    extra: dict[str, list[tuple[str, str]]] = {}
    if with_golden and {"responses", "sources"} <= set(prompts.column_names):
        for r in prompts.select(["id", "responses", "sources"]).to_pylist():
            extra[r["id"]] = [(x, GOLDEN) for x, s in zip(r["responses"], r["sources"], strict=True) if s == GOLDEN]
    scores: list[float] = []
    rows, dropped = to_preferences(samples, reward, source, extra=extra, sample_scores=scores)
    counts = {
        "prompts": samples.num_rows,
        "rows": len(rows),
        "dropped": dropped,
        "golden_responses": sum(r["sources"].count(GOLDEN) for r in rows),
        "sample_reward_mean": sum(scores) / len(scores) if scores else None,
    }
    return rows, counts


def _reward_fingerprint(name: str) -> Any:
    return name if name in ("gold", "biased") else (name, file_fingerprints(name))


def sample_round(
    cfg: RunConfig, run_dir: Path, round_: int, policy: Path, live: LiveGenerators | None = None
) -> dict[str, Any]:
    """Steps 1-2 of a round: sample ``policy`` on the round's training prompts into ``round<r>/samples/`` (on
    ``live``'s generators holding it as version ``round_ - 1``, else on a fresh actor pool) and write the labelled
    rows into ``round<r>/input/``. Each is skipped when its inputs and settings are unchanged, so a new reward
    relabels the same samples. Returns the counts."""
    from raydora import generate as gen
    from raydora.rewards import named_reward

    lp = cfg.loop
    round_dir = run_dir / "loop" / f"round{round_}"
    data_dir = run_dir / "data"
    base = gen.Sampling.from_config(cfg.generate, cfg.seed)
    # Each round draws fresh samples: its own seed, the loop's n and temperature.
    sampling = replace(
        base,
        n=lp.samples,
        seed=base.seed + 1000 * round_,
        temperature=lp.temperature if lp.temperature is not None else base.temperature,
    )
    sample_fp = fingerprint(
        "loop-sample",
        round_,
        file_fingerprints(policy),
        file_fingerprints(data_dir),
        lp.prompts,
        sampling.__dict__,
        cfg.model.max_length,
    )
    samples_dir, input_dir = round_dir / "samples", round_dir / "input"
    prompts = round_prompts(gen.read_prompts(data_dir), round_, lp.prompts)
    if not is_done(samples_dir, sample_fp) and live is not None:
        live.at(policy, round_ - 1).generate(
            prompts.select(["id", "prompt"]), samples_dir, sampling, fp=sample_fp, stage="loop-sample"
        )
    elif not is_done(samples_dir, sample_fp):
        gen.generate(
            policy,
            prompts.select(["id", "prompt"]),
            samples_dir,
            cfg.generate,
            sampling,
            max_length=cfg.model.max_length,
            precision=cfg.model.precision,
            fp=sample_fp,
            stage="loop-sample",
        )
    with_golden = keep_golden(cfg)
    label_fp = fingerprint(
        "loop-label",
        (read_success(samples_dir) or {}).get("finished_at"),
        sample_fp,
        _reward_fingerprint(lp.reward),
        with_golden,
    )
    if is_done(input_dir, label_fp):
        counts: dict[str, Any] = (read_success(input_dir) or {})["counts"]
        return counts
    reward = named_reward(lp.reward, cfg.model.max_length)
    rows, counts = label(gen.read_generations(samples_dir), prompts, reward, source_tag(round_), with_golden)
    if len(rows) < cfg.train.batch_size:
        raise ValueError(
            f"round {round_}: {len(rows)} prompts carried a preference ({counts['dropped']} of "
            f"{counts['prompts']} had fewer than 2 distinct responses or equal rewards), fewer than "
            f"train.batch_size={cfg.train.batch_size}; raise loop.prompts, loop.samples or "
            "loop.temperature"
        )
    with staging(round_dir, "input") as tmp:
        (tmp / "input").mkdir()
        pq.write_table(pa.Table.from_pylist(rows), tmp / "input" / "preferences.parquet")
        write_success(tmp / "input", {"stage": "loop-label", "fingerprint": label_fp, "counts": counts})
        promote(tmp / "input", input_dir)
    return counts


class LiveGenerators:
    """The loop's generator actors (``loop.live_generators``): one :class:`~raydora.generators.GeneratorPool`
    for all rounds, started on first use from the policy it must sample, and synced whenever a sampling needs
    another policy. Version ``v`` is the policy that round ``v`` trained (0: the loop's starting policy), so a
    resumed loop starts its pool at the version of the policy it resumes from."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg: RunConfig = cfg
        self.pool: Any = None
        self.syncs: list[dict[str, Any]] = []

    def at(self, policy: Path, version: int) -> Any:
        """The pool, holding ``policy`` as ``version``."""
        from raydora.generators import GeneratorPool

        if self.pool is None:
            self.pool = GeneratorPool(
                policy,
                self.cfg.generate,
                max_length=self.cfg.model.max_length,
                precision=self.cfg.model.precision,
                version=version,
            )
        elif self.pool.version != version:
            info = self.pool.sync(policy, version)
            self.syncs.append(info)
            print(
                f"[loop] synced {policy} (version {version}, {info['bytes'] / 2**20:.1f} MiB) into "
                f"{len(self.pool.actors)} generators in {info['seconds']:.2f} s",
                flush=True,
            )
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def eval_generations(round_cfg: RunConfig, round_: int, live: LiveGenerators) -> None:
    """The generate stage's folders of round ``round_`` (``sft``: its starting policy, version ``round_ - 1``;
    ``policy``: what it trained, version ``round_``), sampled on the live generators with the stage's prompts,
    sampling and fingerprints, so that the stage then finds them up to date. The starting policy first: one sync."""
    from raydora import generate as gen

    run_dir = round_cfg.run_dir.absolute()
    prompts, sampling, jobs = gen.plan(round_cfg, run_dir)
    for name, model, out, fp in sorted(jobs, key=lambda job: job[0] != "sft"):
        if not is_done(out, fp):
            version = round_ - 1 if name == "sft" else round_
            live.at(model, version).generate(prompts, out, sampling, fp=fp, stage="generate")


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link of ``src`` at ``dst``; a copy where links fail (another filesystem, links not allowed)."""
    import os
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def reuse_baseline(round_cfg: RunConfig, round_: int, run_dir: Path) -> bool:
    """Round ``round_``'s ``generations/sft`` (its starting policy's samples) from round ``round_ - 1``'s
    ``generations/policy`` when that folder holds the same fingerprint (the same model, prompts and sampling):
    hard-linked (or copied) into place with its marker, instead of sampled again. True when it did."""
    import shutil

    from raydora import generate as gen

    if round_ < 2:
        return False
    previous = run_dir / "loop" / f"round{round_ - 1}" / "generations" / "policy"
    jobs = gen.plan(round_cfg, round_cfg.run_dir.absolute())[2]
    for _, _, out, fp in (job for job in jobs if job[0] == "sft"):
        if is_done(out, fp) or not is_done(previous, fp):
            return False
        with staging(out.parent, out.name) as tmp:
            shutil.copytree(previous, tmp / "out", copy_function=_link_or_copy)
            promote(tmp / "out", out)
        return True
    return False


def check(cfg: RunConfig, run_dir: Path, rounds: int) -> None:
    """Fail before any sampling when the loop cannot run to its end."""
    from raydora.classifier import synthetic_sources

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    data_dir = run_dir / "data"
    if read_success(data_dir) is None:
        raise FileNotFoundError(f"{data_dir}: no validated training data; run the pipeline (or validate) first")
    if cfg.loop.reward in ("gold", "biased") and cfg.data.input is not None:
        raise ValueError(
            f"loop.reward={cfg.loop.reward} scores the synthetic benchmark's prompts only; with your "
            "own data (data.input) give a reward model or raydora classifier folder"
        )
    if cfg.loop.live_generators and cfg.generate.actors == 0:
        raise ValueError(
            "loop.live_generators keeps generate.actors actors alive for every round: set generate.actors >= 1 "
            "(or loop.live_generators=false to sample each round in this process)"
        )
    if cfg.train.loss not in PAIRWISE_LOSSES:
        raise ValueError(
            f"train.loss={cfg.train.loss} is listwise: it needs one number of responses per row, "
            "and the loop's rows hold each prompt's distinct samples; use a pairwise loss"
        )
    if cfg.train.objective in P_GOLDEN_OBJECTIVES:
        if not keep_golden(cfg):
            raise ValueError(
                f"train.objective={cfg.train.objective} needs golden responses in every round: "
                "leave loop.keep_golden unset (or true)"
            )
        if synthetic_sources(data_dir).get(GOLDEN, 0) == 0:
            raise ValueError(
                f"train.objective={cfg.train.objective}: {data_dir} has no golden responses to set "
                "against the policy's samples"
            )


def run(
    cfg: RunConfig, rounds: int | None = None, *, timings: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """``rounds`` (default ``loop.rounds``) rounds of the online loop over ``cfg``'s run directory, which must
    hold validated data (``data/``); returns one summary per round (also in ``<run>/loop/summary.json``).
    ``timings``, when given, receives each round's seconds (whole round, weight syncs, training) and samples/s."""
    from raydora.cluster import init_ray

    run_dir = cfg.run_dir.absolute()
    n = cfg.loop.rounds if rounds is None else rounds
    check(cfg, run_dir, n)
    init_ray(cfg.ray)
    policy = start_policy(cfg, run_dir)
    round_config(cfg, run_dir, 1, policy)  # a config error (e.g. no held-out prompts) before any sampling
    stages = ["validate", "classify", "reference", "train", "generate", "evaluate"]
    if cfg.train.objective not in P_GOLDEN_OBJECTIVES:
        stages.remove("classify")
    live = LiveGenerators(cfg) if cfg.loop.live_generators else None
    try:
        summaries = [
            _round(cfg, run_dir, r, policy, stages, live, timings) for r, policy in _rounds(run_dir, policy, n)
        ]
    finally:
        if live is not None:
            live.close()
    out = run_dir / "loop" / "summary.json"
    out.write_text(json.dumps(summaries, indent=2) + "\n")
    print(f"[loop] summary: {out}", flush=True)
    return summaries


def _rounds(run_dir: Path, start: Path, n: int) -> list[tuple[int, Path]]:
    """``(round, starting policy)`` of rounds 1..n: round r starts from round r-1's ``train/final``."""
    return [(r, start if r == 1 else run_dir / "loop" / f"round{r - 1}" / "train" / "final") for r in range(1, n + 1)]


def _round(
    cfg: RunConfig,
    run_dir: Path,
    r: int,
    policy: Path,
    stages: list[str],
    live: LiveGenerators | None,
    timings: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One round (sample, label, the round's stages); its summary. Prints a line of its timings."""
    import time

    from raydora import pipeline

    began = time.perf_counter()
    syncs = len(live.syncs) if live is not None else 0
    print(f"[loop] round {r}: sampling {policy}", flush=True)
    samples_dir = run_dir / "loop" / f"round{r}" / "samples"
    earlier = (read_success(samples_dir) or {}).get("finished_at")
    counts = sample_round(cfg, run_dir, r, policy, live)
    round_cfg = round_config(cfg, run_dir, r, policy)
    if reuse_baseline(round_cfg, r, run_dir):
        print(f"[loop] round {r}: the evaluation baseline is round {r - 1}'s policy samples (linked)", flush=True)
    results = []
    if live is None:
        results += pipeline.run(round_cfg, stages)
    else:
        # The stages up to training, then the evaluation's samples on the live generators (the generate stage
        # then skips), then the rest.
        cut = stages.index("generate")
        results += pipeline.run(round_cfg, stages[:cut])
        eval_generations(round_cfg, r, live)
        results += pipeline.run(round_cfg, stages[cut:])
    round_dir = round_cfg.run_dir.absolute()
    report = json.loads((round_dir / "eval" / "report.json").read_text())
    summary = {
        "round": r,
        "start_policy": str(policy),
        "policy": str(round_dir / "train" / "final"),
        **counts,
        "win_rates": {k: v["win_rate"] for k, v in report["win_rates"].items()},
        "win_rate_ci95": {k: v["ci95"] for k, v in report["win_rates"].items()},
        "mean_reward": report.get("mean_reward"),
    }
    wr = summary["win_rates"].get("sft")
    print(
        f"[loop] round {r}: {counts['rows']} rows ({counts['dropped']} prompts without a preference), "
        f"samples' mean reward {counts['sample_reward_mean'] or float('nan'):.3f}"
        + (f", win rate vs round {r - 1} {wr:.3f}" if wr is not None else ""),
        flush=True,
    )
    sampled = read_success(samples_dir) or {}
    per_s = None
    if sampled.get("finished_at") == earlier:
        rate = "samples up to date"
    else:
        where = "live" if live is not None else "fresh"
        per_s = sampled["rows"]["samples"] / sampled["seconds"]
        rate = f"{per_s:.1f} samples/s ({sampled['backend']}, {where} generators)"
    sync = sum(x["seconds"] for x in live.syncs[syncs:]) if live is not None else 0.0
    train = next((x for x in results if x.stage == "train"), None)
    train_s = None if train is None or train.skipped else float(train.info["seconds"])
    trained = "train up to date" if train_s is None else f"train {train_s:.1f} s"
    seconds = time.perf_counter() - began
    print(f"[loop] round {r} timings: {rate}, sync {sync:.2f} s, {trained}, round {seconds:.1f} s", flush=True)
    if timings is not None:
        timings.append(
            {"round": r, "seconds": seconds, "sync_seconds": sync, "train_seconds": train_s, "samples_per_s": per_s}
        )
    return summary


def table(summaries: list[dict[str, Any]]) -> str:
    """The rounds as a text table: rows, prompts without a preference, the samples' mean reward, win rates."""
    lines = ["round  rows  dropped  sample reward  win rate vs previous round [95% CI]"]
    for s in summaries:
        wr, ci = s["win_rates"].get("sft"), s["win_rate_ci95"].get("sft")
        shown = f"{wr:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if wr is not None else "-"
        mean = s["sample_reward_mean"]
        reward = f"{mean:>13.3f}" if mean is not None else f"{'-':>13}"
        lines.append(f"{s['round']:>5}  {s['rows']:>4}  {s['dropped']:>7}  {reward}  {shown}")
    return "\n".join(lines) + "\n"
