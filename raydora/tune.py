"""``raydora tune``: a hyperparameter search on Ray Tune whose trials are child runs of one base run.

The driver runs the base run's upstream stages once (synth, validate, classify when an objective needs it, sft,
reference: :func:`upstream_stages`), prepares the validation pairs (:func:`prepare_validation`: your
``tune.validation`` rows, or on the synthetic benchmark gold-labelled rows drawn apart from train, SFT and eval,
validated and tokenised as the training data) and their reference log-probs, then hands the search to a
``ray.tune.Tuner``: the space of ``tune.space`` as Tune's samplers, its random search (``BasicVariantGenerator``
seeded by ``tune.seed``, which also caps the trials at once: ``tune.max_concurrent_trials``), ASHA or FIFO, and
Tune's experiment folder ``<run>/tune/experiment`` (restored by ``Tuner.restore`` when the command is rerun after a
crash: finished trials are kept, unfinished ones rerun, and their train stage resumes from its own newest
checkpoint).

A trial (:func:`trial`) is an ordinary run folder ``<run>/tune/trials/trial_<trial id>/`` whose upstream stage
folders are links into the base run (``experiment.link_shared``); it runs the train stage (a Ray Train
``TorchTrainer`` started from inside the trial, which claims 0.01 CPU itself: the trainer's workers claim the CPUs)
and reports the implicit reward's accuracy and mean margin, and the policy's own log-prob accuracy, on the
validation pairs, once, with ``ray.tune.report``.
It never reads the evaluation prompts (the benchmark's ``synth/eval``, your data's ``heldout/``) nor generates or
evaluates.

Why one report: the train stage's fingerprint holds ``train.max_steps`` and its learning-rate schedule spans the
whole run, so training in rungs (stop, evaluate, continue with more steps) would restart each rung from scratch.
ASHA therefore sees one result per trial: it is wired (``tune.scheduler``) but stops no trial early.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raydora import experiment
from raydora.config import P_GOLDEN_OBJECTIVES, ConfigError, RunConfig, dump_yaml, from_dict, to_dict
from raydora.tuneconf import Distribution

__all__ = [
    "Prepared",
    "check_space",
    "prepare",
    "prepare_validation",
    "run",
    "search",
    "table",
    "trial",
    "trial_overrides",
    "upstream_stages",
]

EXPERIMENT = "experiment"  # Tune's experiment folder under <run>/tune/
# What a trial claims itself: next to nothing (Tune refuses 0); its trainer's workers and its encoding actors claim
# the CPUs (a whole CPU here would leave a 2-CPU machine no room for a 1-worker trainer).
TRIAL_CPUS = 0.01
REFERENCE_LOGPS = "validation_reference"  # the base run's eval_logps/ cache of the validation pairs' reference pass
# Config keys that may name a relative local path: made absolute, since Tune runs each trial in a folder of its own.
PATH_KEYS = ("data.input", "data.target", "model.policy", "model.tokenizer", "classifier.backbone", "tune.validation")


def trial_overrides(config: Mapping[str, Any]) -> list[str]:
    """A trial's sampled values (Tune's ``config``: dotted key -> value) as dotted overrides, in key order."""
    return [f"{key}={json.dumps(value)}" for key, value in sorted(config.items())]


def check_space(cfg: RunConfig) -> dict[str, Distribution]:
    """``tune.space`` parsed, after checking that the config stays valid at every end of each range and at every
    choice (a bad key or value fails here, naming ``tune.space.<key>``, not in a trial)."""
    space = cfg.tune.distributions()
    if not space:
        raise ConfigError("tune.space", "is empty: name at least one train.<key> and its distribution")
    base = to_dict(cfg)
    for key, dist in space.items():
        for value in dist.points():
            try:
                from_dict(base, [f"{key}={json.dumps(value)}"])
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}", f"{value!r} gives an invalid config: {e}") from None
    return space


def upstream_stages(cfg: RunConfig) -> list[str]:
    """The base run's stages before training: synth without ``data.input``; classify when the base objective or an
    objective the space can draw reads p_golden."""
    objectives: set[str] = {cfg.train.objective}
    dist = cfg.tune.distributions().get("train.objective")
    if dist is not None:
        objectives |= {str(v) for v in dist.args}
    stages = ["synth"] if cfg.data.input is None else []
    stages.append("validate")
    if objectives & set(P_GOLDEN_OBJECTIVES):
        stages.append("classify")
    return [*stages, "sft", "reference"]


def _absolute(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``root`` and the local paths of :data:`PATH_KEYS` made absolute."""
    over = [f"root={json.dumps(str(Path(cfg.root).absolute()))}"]
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and "://" not in value and Path(value).exists() and not Path(value).is_absolute():
            over.append(f"{key}={json.dumps(str(Path(value).absolute()))}")
    return from_dict(to_dict(cfg), over)


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless ``path`` holds it already (a rerun keeps the mtime, so nothing downstream recomputes)."""
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)


def prepare_validation(cfg: RunConfig, base_dir: Path) -> Path:
    """The validation pairs, validated as training data into ``<run>/tune/validation/data`` (returned).

    The rows: ``tune.validation``; without it, on the synthetic benchmark, ``tune.validation_rows`` rows labelled by
    gold, drawn apart from the train, SFT and eval prompts (``<run>/tune/validation.jsonl``)."""
    from raydora import synth
    from raydora.reference import tokenizer_dir
    from raydora.validate import TokenLimits, validate

    tune_dir = base_dir / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    source = cfg.tune.validation
    if source is None:
        if cfg.data.input is not None:
            raise ConfigError(
                "tune.validation",
                "your own data (data.input) needs a validation set: a few hundred preference rows labelled by the "
                "target preference, apart from the training rows and the evaluation prompts",
            )
        s = cfg.synth
        shares = {"golden": s.alpha, **s.source_shares}
        exclude = synth.split_prompts(base_dir / "synth")
        rows = synth.validation_rows(cfg.tune.validation_rows, k=s.k, shares=shares, seed=cfg.seed, exclude=exclude)
        source = str(tune_dir / "validation.jsonl")
        _write_if_changed(Path(source), "".join(json.dumps(r) + "\n" for r in rows))
    limits = None
    if cfg.data.truncation == "drop":
        limits = TokenLimits(cfg.model.max_length, cfg.model.max_prompt_length, str(tokenizer_dir(cfg, base_dir)))
    result = validate(
        source, tune_dir / "validation", cfg.data.format, cfg.data.max_chars, cfg.model.tokenizer, limits=limits
    )
    if not result.counts.get("valid"):
        raise ValueError(f"tune.validation={source}: no valid preference rows ({result.counts})")
    return tune_dir / "validation" / "data"


def _validation_metrics(cfg: RunConfig, run_dir: Path, base_dir: Path, validation: Path) -> dict[str, Any]:
    """The trained policy's implicit-reward metrics on the validation pairs, against the reference (the base's
    initial policy, whose log-probs the driver cached)."""
    from raydora.evaluate import heldout_logps, preference_metrics
    from raydora.reference import initial_policy, trained_policy

    policy = trained_policy(run_dir)
    if policy is None:
        raise FileNotFoundError(f"{run_dir / 'train'}: the train stage did not finish")
    ref = heldout_logps(cfg, base_dir, REFERENCE_LOGPS, initial_policy(cfg, base_dir), rows=validation)
    pol = heldout_logps(cfg, run_dir, "validation", policy, rows=validation)
    m = preference_metrics(pol, ref, cfg.train.beta, cfg.evaluate.bootstrap, cfg.seed)
    return {
        "accuracy": m["accuracy"]["mean"],
        "accuracy_ci95": m["accuracy"]["ci95"],
        "margin": m["margin"]["mean"],
        "logp_accuracy": m["logp_accuracy"]["mean"],
        "logp_accuracy_ci95": m["logp_accuracy"]["ci95"],
        "pairs": len(ref),
    }


SAMPLES = "validation_samples"  # <base>/tune/ and each trial folder: samples of the validation prompts


def _auto_reward(cfg: RunConfig, validation: Path) -> str:
    """evaluate.reward's ``auto`` rule on the validation prompts: ``gold`` on the benchmark's prompts, else ``none``."""
    from raydora.evaluate import resolve_reward
    from raydora.generate import read_prompts

    return resolve_reward(from_dict(to_dict(cfg), ['evaluate.reward="auto"']), read_prompts(validation, 8))


def reward_name(cfg: RunConfig, validation: Path) -> str:
    """``tune.reward`` with ``auto`` resolved as the evaluate stage resolves ``evaluate.reward`` (the benchmark's gold
    reward on its prompts, else none); raises when ``tune.metric: reward_win_rate`` has no reward to use."""
    name = cfg.tune.reward
    if name == "auto":
        name = _auto_reward(cfg, validation)
    if name == "none":
        raise ConfigError(
            "tune.reward",
            "tune.metric=reward_win_rate needs a reward for the validation samples: gold, biased, or a local "
            "reward-model (or raydora classifier) folder",
        )
    return name


def resolve_metric(cfg: RunConfig, validation: Path) -> RunConfig:
    """``cfg`` with ``tune.metric: auto`` resolved: ``reward_win_rate`` when ``tune.reward`` names a reward or its
    ``auto`` finds one for the validation prompts, else ``logp_accuracy``; any other metric as it is."""
    if cfg.tune.metric != "auto":
        return cfg
    has_reward = cfg.tune.reward != "auto" or _auto_reward(cfg, validation) != "none"
    metric = "reward_win_rate" if has_reward else "logp_accuracy"
    print(f"[tune] tune.metric=auto: selecting on {metric}", flush=True)
    return from_dict(to_dict(cfg), [f"tune.metric={metric}"])


def validation_samples(cfg: RunConfig, folder: Path, model: Path, validation: Path) -> Path:
    """``model``'s samples of the first ``tune.sample_prompts`` validation prompts (generate's sampling settings and
    seeds) in ``folder/validation_samples``; skipped when up to date."""
    from dataclasses import asdict

    from raydora.generate import Sampling, generate, read_prompts
    from raydora.rundir import file_fingerprints, fingerprint, is_done

    n = cfg.tune.sample_prompts
    sampling = Sampling.from_config(cfg.generate, cfg.seed)
    model_fp, rows_fp = file_fingerprints(model), file_fingerprints(validation)
    fp = fingerprint("tune-samples", model_fp, rows_fp, n, asdict(sampling), cfg.model.max_length)
    out = folder / SAMPLES
    if not is_done(out, fp):
        prompts = read_prompts(validation, n)
        m = cfg.model
        generate(model, prompts, out, cfg.generate, sampling, max_length=m.max_length, precision=m.precision, fp=fp)
    return out


def reward_metrics(cfg: RunConfig, run_dir: Path, base_dir: Path, validation: Path, policy: Path) -> dict[str, Any]:
    """``reward_win_rate`` (win + tie/2 of ``policy``'s validation samples against the reference policy's, per
    prompt, by ``tune.reward``), its 95% interval, and the mean rewards of both."""
    from raydora.evaluate import _score_sets, win_rate
    from raydora.generate import read_generations, read_prompts
    from raydora.reference import initial_policy
    from raydora.rewards import named_reward

    name = reward_name(cfg, validation)
    reference = validation_samples(cfg, base_dir / "tune", initial_policy(cfg, base_dir), validation)
    samples = validation_samples(cfg, run_dir, policy, validation)
    prompts = read_prompts(validation, cfg.tune.sample_prompts)
    ids = prompts.column("id").to_pylist()
    sets = {}
    for key, folder in (("policy", samples), ("reference", reference)):
        t = read_generations(folder)
        by_id = dict(zip(t.column("id").to_pylist(), t.column("generations").to_pylist(), strict=True))
        sets[key] = [by_id.get(i, []) for i in ids]
    # One call of the reward for both sets (one Ray Data pass for a reward model), as the evaluate stage scores.
    rewards = _score_sets(named_reward(name, cfg.model.max_length), prompts.column("prompt").to_pylist(), sets)
    scored = [rewards["policy"], rewards["reference"]]
    w = win_rate(scored[0], scored[1], cfg.evaluate.tie_tolerance, cfg.evaluate.bootstrap, cfg.seed)
    mean = [float(sum(sum(r) for r in rows) / max(1, sum(len(r) for r in rows))) for rows in scored]
    return {
        "reward_win_rate": w["win_rate"],
        "reward_win_rate_ci95": w["ci95"],
        "reward": mean[0],
        "reward_reference": mean[1],
    }


def trial(config: dict[str, Any], *, base: dict[str, Any], base_dir: str, validation: str) -> None:
    """Ray Tune function trainable: the base config (``base``, a plain dict) with the sampled ``config`` as a child
    run ``<base_dir>/tune/trials/trial_<trial id>`` linking the base's upstream stages; trains, then reports the
    validation metrics (and the run folder) once."""
    from ray import tune as ray_tune

    trial_id = ray_tune.get_context().get_trial_id()
    root = Path(base_dir) / "tune" / "trials"
    name = json.dumps(f"trial_{trial_id}")
    cfg = from_dict(base, [f"root={json.dumps(str(root))}", f"name={name}", *trial_overrides(config)])
    plan = experiment.ChildPlan(own=(), stages=("train",))
    run_dir = experiment.run_child(cfg, base_dir, plan, done="train")
    metrics = _validation_metrics(cfg, run_dir, Path(base_dir), Path(validation))
    if cfg.tune.metric == "reward_win_rate":
        from raydora.reference import trained_policy

        policy = trained_policy(run_dir)
        assert policy is not None  # _validation_metrics raised otherwise
        metrics.update(reward_metrics(cfg, run_dir, Path(base_dir), Path(validation), policy))
    ray_tune.report({**metrics, "run_dir": str(run_dir)})


def _search_key(cfg: RunConfig) -> dict[str, Any]:
    """What a restored experiment must share with the command that restores it."""
    t = cfg.tune
    return {
        "space": dict(t.space),
        "num_samples": t.num_samples,
        "metric": t.metric,
        "scheduler": t.scheduler,
        "grace_period": t.grace_period,
        "seed": cfg.seed if t.seed is None else t.seed,
    }


def _sampler(dist: Distribution) -> Any:
    from ray import tune as ray_tune

    if dist.kind == "choice":
        return ray_tune.choice(list(dist.args))
    fn = {"uniform": ray_tune.uniform, "loguniform": ray_tune.loguniform, "randint": ray_tune.randint}[dist.kind]
    return fn(*dist.args)


def _tuner(cfg: RunConfig, space: dict[str, Distribution], trainable: Any, tune_dir: Path) -> Any:
    """A new Tuner, or Tune's own restore of ``<tune_dir>/experiment`` (finished trials kept, the rest rerun)."""
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    path = tune_dir / EXPERIMENT
    key_file = tune_dir / "search.json"
    key = _search_key(cfg)
    if ray_tune.Tuner.can_restore(str(path)):
        old = json.loads(key_file.read_text()) if key_file.is_file() else None
        if old != key:
            raise ConfigError(
                "tune",
                f"{path} holds a search with other settings ({old}); remove it (or use another name) to search {key}",
            )
        print(f"[tune] resuming {path}: finished trials are kept", flush=True)
        return ray_tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    key_file.write_text(json.dumps(key, indent=1))
    t = cfg.tune
    scheduler = FIFOScheduler() if t.scheduler == "fifo" else ASHAScheduler(grace_period=t.grace_period)
    return ray_tune.Tuner(
        trainable,
        param_space={k: _sampler(d) for k, d in space.items()},
        tune_config=ray_tune.TuneConfig(
            metric=t.metric,
            mode="max",
            num_samples=t.num_samples,
            # Tune's random search; it limits concurrency itself (TuneConfig's max_concurrent_trials is ignored
            # next to a search generator).
            search_alg=BasicVariantGenerator(random_state=key["seed"], max_concurrent=t.max_concurrent_trials),
            scheduler=scheduler,
        ),
        run_config=ray_tune.RunConfig(name=EXPERIMENT, storage_path=str(tune_dir), verbose=1),
    )


def _best(results: Sequence[Any], metric: str) -> Any:
    """The Tune result with the highest ``metric``; ties (a few hundred pairs give few distinct accuracies) go to the
    higher other metric (margin for either accuracy, accuracy for margin), then to the first trial id, so that a
    restored search names the same trial as the run it continues (Tune's ``get_best_result`` keeps the first in its
    own trial order, which a restore may change)."""
    other = {"margin": "accuracy", "reward_win_rate": "logp_accuracy"}.get(metric, "margin")
    ordered = sorted(results, key=lambda r: str(r.metrics.get("trial_id")))
    return max(ordered, key=lambda r: (float(r.metrics[metric]), float(r.metrics[other])))


def table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str) -> str:
    """The trials as a fixed-width table, best first: trial, each searched key, the validation metrics, status."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    def order(r: Mapping[str, Any]) -> float:
        v = r.get(metric)
        return -float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf

    metrics = ["accuracy", "margin", "logp_accuracy"]
    if any("reward_win_rate" in r for r in rows):
        metrics.append("reward_win_rate")
    head = ["trial", *keys, *metrics, "status"]
    body = [
        [
            str(r["trial"]),
            *(fmt(r["config"].get(k)) for k in keys),
            *(fmt(r.get(m, "-")) for m in metrics),
            str(r["status"]),
        ]
        for r in sorted(rows, key=order)
    ]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [head, *body]]
    return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` leaves for :func:`search`: the config with absolute paths, the base run folder, the
    validated validation pairs and their count."""

    cfg: RunConfig
    base_dir: Path
    validation: Path
    pairs: int


def prepare(cfg: RunConfig) -> Prepared:
    """The base run's upstream stages, the validation pairs and their reference log-probs (each skipped when up
    to date)."""
    from raydora import pipeline
    from raydora.evaluate import heldout_logps
    from raydora.reference import initial_policy

    check_space(cfg)
    cfg = _absolute(cfg)
    base_dir = cfg.run_dir
    pipeline.run(cfg, upstream_stages(cfg))
    validation = prepare_validation(cfg, base_dir)
    cfg = resolve_metric(cfg, validation)
    pairs = len(heldout_logps(cfg, base_dir, REFERENCE_LOGPS, initial_policy(cfg, base_dir), rows=validation))
    if cfg.tune.metric == "reward_win_rate":  # the reward exists, and the reference policy's samples, once
        reward_name(cfg, validation)
        validation_samples(cfg, base_dir / "tune", initial_policy(cfg, base_dir), validation)
    return Prepared(cfg, base_dir, validation, pairs)


def run(cfg: RunConfig) -> dict[str, Any]:
    """``raydora tune``: :func:`prepare`, then :func:`search`."""
    return search(prepare(cfg))


def search(prep: Prepared) -> dict[str, Any]:
    """Run (or resume) the Tuner over the prepared base run, then write ``<run>/tune/best.json`` and ``best.yaml``
    (the best trial's full config). Returns best.json's content (plus ``table``). Raises when the search was
    interrupted (rerun to resume) or no trial finished."""
    from ray import tune as ray_tune

    cfg, base_dir, validation = prep.cfg, prep.base_dir, prep.validation
    space = check_space(cfg)
    print(f"[tune] {prep.pairs} validation pairs; {cfg.tune.num_samples} trials over {', '.join(space)}", flush=True)
    trainable = ray_tune.with_parameters(trial, base=to_dict(cfg), base_dir=str(base_dir), validation=str(validation))
    trainable = ray_tune.with_resources(trainable, {"cpu": TRIAL_CPUS})
    tune_dir = base_dir / "tune"
    grid = _tuner(cfg, space, trainable, tune_dir).fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        status = "error" if result.error else ("done" if cfg.tune.metric in m else "no result")
        rows.append(
            {
                "trial": m.get("trial_id", Path(result.path).name),
                "config": result.config or {},
                "status": status,
                **{k: m[k] for k in ("accuracy", "margin", "logp_accuracy", "reward_win_rate", "run_dir") if k in m},
            }
        )
    shown = table(rows, list(space), cfg.tune.metric)
    print(shown, end="", flush=True)
    if any(r["status"] == "no result" for r in rows):  # Ctrl+C / SIGUSR1: Tune saved the experiment's state
        raise RuntimeError(f"{tune_dir / EXPERIMENT}: the search was interrupted; rerun the command to resume it")
    if not any(r["status"] == "done" for r in rows):
        raise RuntimeError(f"no trial of {tune_dir / EXPERIMENT} finished:\n{shown}")
    best = _best([r for r in grid if not r.error and cfg.tune.metric in (r.metrics or {})], cfg.tune.metric)
    run_dir = Path(best.metrics["run_dir"])
    out = {
        "metric": cfg.tune.metric,
        "value": best.metrics[cfg.tune.metric],
        "accuracy": best.metrics["accuracy"],
        "margin": best.metrics["margin"],
        "logp_accuracy": best.metrics.get("logp_accuracy"),
        "reward_win_rate": best.metrics.get("reward_win_rate"),
        "validation_pairs": best.metrics["pairs"],
        "overrides": dict(sorted(best.config.items())),
        "dotted": trial_overrides(best.config),
        "trial_id": best.metrics.get("trial_id"),
        "run_dir": str(run_dir),
        "trials": len(rows),
        "errors": sum(r["status"] == "error" for r in rows),
    }
    (tune_dir / "best.json").write_text(json.dumps(out, indent=1) + "\n")
    best_cfg = from_dict(to_dict(cfg), trial_overrides(best.config))
    (tune_dir / "best.yaml").write_text(dump_yaml(best_cfg))
    print(f"[tune] best {cfg.tune.metric} {out['value']:.4g}: {' '.join(out['dotted'])} ({run_dir})", flush=True)
    print(f"[tune] {tune_dir / 'best.json'}; {tune_dir / 'best.yaml'} is its config", flush=True)
    return {**out, "table": shown}
