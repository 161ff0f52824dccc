"""raydora tune: the ``tune`` section's parsing and errors (no Ray), and a real Ray Tune search on the synthetic
benchmark: trials link the base run's upstream stages, never read the evaluation prompts, the best trial is the
argmax of what they reported, and an interrupted search resumes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from raydora import experiment, synth
from raydora import tune as rtune
from raydora.config import ConfigError, load_config
from raydora.tuneconf import Distribution, parse_distribution


# ---- the config section (no Ray) ---------------------------------------------------------------------------------
def test_distribution_strings_parse_into_tunes_samplers_arguments() -> None:
    assert parse_distribution("loguniform(0.01, 10)") == Distribution("loguniform", (0.01, 10.0))
    assert parse_distribution(" uniform( -1 , 2.5 ) ") == Distribution("uniform", (-1.0, 2.5))
    assert parse_distribution("randint(2, 9)") == Distribution("randint", (2, 9))
    assert parse_distribution("randint(2, 9)").points() == (2, 8)  # Tune's randint excludes the upper end
    assert parse_distribution("choice([0.05, 0.1, dora])") == Distribution("choice", (0.05, 0.1, "dora"))
    # Exponents without a dot, which YAML 1.1 reads as strings, are numbers (the form users write learning rates in).
    assert parse_distribution("loguniform(3e-5, 1E-3)") == Distribution("loguniform", (3e-5, 1e-3))
    assert parse_distribution("choice([1e-4, 2.5e+1, e5])") == Distribution("choice", (1e-4, 25.0, "e5"))
    for bad, says in [
        ("normal(0, 1)", "is not a distribution"),
        ("loguniform(0, 10)", "0 < low < high"),
        ("uniform(2, 1)", "low < high"),
        ("uniform(1)", "low < high"),
        ("randint(1.5, 4)", "an integer"),
        ("choice([])", "one of the listed values"),
        ("choice(0.1, 0.2)", "one of the listed values"),
        ("loguniform(1e-3, inf)", "0 < low < high"),
    ]:
        with pytest.raises(ConfigError, match=says) as e:
            parse_distribution(bad, "space.train.lam")
        assert e.value.key == "space.train.lam"


def test_the_tune_section_reads_nested_or_dotted_and_names_the_key_at_fault(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "tune:\n  space:\n    train:\n      lam: loguniform(0.01, 10)\n    train.beta: choice([0.05, 0.1])\n"
    )
    nested = load_config(yaml_file).tune
    dotted = load_config(
        None, ["tune.space.train.lam=loguniform(0.01, 10)", "tune.space.train.beta=choice([0.05, 0.1])"]
    )
    assert (
        nested.space == dotted.tune.space == {"train.lam": "loguniform(0.01, 10)", "train.beta": "choice([0.05, 0.1])"}
    )
    assert nested.distributions()["train.lam"] == Distribution("loguniform", (0.01, 10.0))
    assert load_config(None, []).tune.space == {} and load_config(None, []).tune.metric == "auto"
    errors = {
        "tune.space.sft.lr=uniform(1e-4, 1e-3)": "tune.space.sft.lr: only train.<key> can be tuned",
        "tune.space.seed=choice([0, 1])": "tune.space.seed: only train.<key>",
        "tune.space.train.lam=loguniform(-1, 10)": "tune.space.train.lam: 'loguniform(-1, 10)'",
        "tune.num_samples=0": "tune.num_samples: must be > 0",
        "tune.metric=loss": "tune.metric: must be one of 'auto', 'accuracy'",
        "tune.max_concurrent_trials=-1": "tune.max_concurrent_trials: must be >= 0",
        "tune.scheduler=pbt": "tune.scheduler: must be one of 'asha', 'fifo'",
    }
    for override, says in errors.items():
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [override])


def test_check_space_builds_the_config_at_every_end_and_choice() -> None:
    """A key the train section lacks, or a value its checks refuse (at a range's end or any choice), fails before
    any trial starts, naming the space's key."""
    ok = load_config(None, ["tune.space.train.lam=loguniform(0.01, 10)", "tune.space.train.objective=choice([dora])"])
    assert set(rtune.check_space(ok)) == {"train.lam", "train.objective"}
    assert rtune.upstream_stages(ok) == ["synth", "validate", "classify", "sft", "reference"]  # dora reads p_golden
    erm = load_config(None, ["tune.space.train.lam=uniform(0.1, 1)", "data.input=x.jsonl"])
    assert rtune.upstream_stages(erm) == ["validate", "sft", "reference"]
    for override, says in [
        ("tune.space.train.lam=uniform(-1, 1)", "tune.space.train.lam: -1.0 gives an invalid config: train.lam"),
        ("tune.space.train.objective=choice([erm, nope])", "tune.space.train.objective: 'nope' gives"),
        (
            "tune.space.train.lamda=uniform(0.1, 1)",
            "tune.space.train.lamda: 0.1 gives an invalid config: train.lamda: unknown key",
        ),
    ]:
        with pytest.raises(ConfigError, match=re.escape(says)):
            rtune.check_space(load_config(None, [override]))
    with pytest.raises(ConfigError, match=r"tune\.space: is empty"):
        rtune.check_space(load_config(None, []))


def test_the_command_names_the_key_at_fault_before_starting_ray(capsys: pytest.CaptureFixture[str]) -> None:
    from raydora import cli

    assert cli.main(["tune", "tune.space.train.lam=uniform(-1, 1)"]) == 2
    assert "config error: tune.space.train.lam: -1.0 gives an invalid config" in capsys.readouterr().err
    assert cli.main(["tune"]) == 2
    assert "tune.space: is empty" in capsys.readouterr().err
    assert cli.main(["tune", "tune.space.sft.lr=uniform(0.1, 1)"]) == 2
    assert "tune.space.sft.lr: only train.<key> can be tuned" in capsys.readouterr().err


def test_reward_selection_needs_a_reward(tmp_path: Path) -> None:
    prompts = tmp_path / "val.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hello.", "chosen": "hi", "rejected": "no"}) + "\n")
    cfg = load_config(None, ["tune.metric=reward_win_rate"])
    with pytest.raises(ConfigError, match=re.escape("tune.reward: tune.metric=reward_win_rate needs a reward")):
        rtune.reward_name(cfg, prompts)  # auto: not the benchmark's prompts, so no reward
    assert rtune.reward_name(load_config(None, ["tune.reward=biased"]), prompts) == "biased"
    with pytest.raises(ConfigError, match=re.escape("tune.sample_prompts: must be > 0")):
        load_config(None, ["tune.sample_prompts=0"])


def test_the_auto_metric_selects_on_a_reward_when_there_is_one(tmp_path: Path) -> None:
    # tune.metric=auto (the default): the reward of the validation samples where a reward exists (the benchmark's
    # gold, or one named), else the policy's own log-prob accuracy; never the implicit reward's accuracy, which
    # ranked trials against their win rate on biased labels (docs/tune.md).
    user = tmp_path / "val.jsonl"
    user.write_text(json.dumps({"prompt": "Say hello.", "chosen": "hi", "rejected": "no"}) + "\n")
    bench = tmp_path / "bench.jsonl"
    rows = synth.validation_rows(4, k=2, shares={"golden": 0.5, "verbose": 0.5}, seed=0, exclude=set())
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def metric(path: Path, *overrides: str) -> str:
        return rtune.resolve_metric(load_config(None, list(overrides)), path).tune.metric

    assert metric(bench) == "reward_win_rate"
    assert metric(user) == "logp_accuracy"
    assert metric(user, "tune.reward=biased") == "reward_win_rate"
    assert metric(bench, "tune.metric=accuracy") == "accuracy"  # a metric named is kept


def test_trial_overrides_and_the_table() -> None:
    assert rtune.trial_overrides({"train.objective": "dora", "train.lam": 0.5}) == [
        "train.lam=0.5",
        'train.objective="dora"',
    ]
    rows = [
        {"trial": "a", "config": {"train.lam": 0.123456}, "accuracy": 0.5, "margin": 0.1, "logp_accuracy": 0.625,
         "status": "done"},
        {"trial": "b", "config": {"train.lam": 2.0}, "status": "error"},
        {"trial": "c", "config": {"train.lam": 1.0}, "accuracy": 0.75, "margin": -0.2, "logp_accuracy": 0.5,
         "status": "done"},
    ]  # fmt: skip
    lines = rtune.table(rows, ["train.lam"], "accuracy").splitlines()
    assert lines[0].split() == ["trial", "train.lam", "accuracy", "margin", "logp_accuracy", "status"]
    assert [line.split()[0] for line in lines[1:]] == ["c", "a", "b"]  # best first, no result last
    assert lines[2].split()[1:] == ["0.1235", "0.5", "0.1", "0.625", "done"]
    by_logp = rtune.table(rows, ["train.lam"], "logp_accuracy").splitlines()
    assert [line.split()[0] for line in by_logp[1:]] == ["a", "c", "b"]


def test_synthetic_validation_rows_are_gold_labelled_and_apart() -> None:
    shares = {"golden": 0.25, "verbose": 0.375, "sloppy": 0.375}
    train = {r["prompt"] for r in synth.generate_rows(0, 64, k=4, shares=shares, label_noise=0.5, seed=3)}
    rows = synth.validation_rows(40, k=4, shares=shares, seed=3, exclude=train)
    assert len(rows) == 40 and len({r["prompt"] for r in rows}) == 40 and not {r["prompt"] for r in rows} & train
    for r in rows:
        gold = [synth.gold_reward(r["prompt"], x) for x in r["responses"]]
        assert r["scores"] == pytest.approx(gold, abs=1e-5) and r["split"] == "validation"
    assert rows == synth.validation_rows(40, k=4, shares=shares, seed=3, exclude=train)  # deterministic


# ---- a real search (Ray Tune; each trial trains in its own actor) ------------------------------------------------
TINY = [
    "name=base",
    "seed=0",
    "model.precision=fp32",
    "model.max_length=64",
    "model.vocab_size=320",
    "synth.rows=48",
    "synth.eval_rows=8",
    "sft.batch_size=8",
    "sft.micro_batch_size=8",
    "sft.num_workers=0",  # SFT in this process
    "train.objective=kl_dro",
    "train.num_workers=0",  # each trial trains in its Tune actor (Ray Train: test_train.py)
    "train.batch_size=8",
    "train.micro_batch_size=8",
    "train.max_steps=2",
    "train.checkpoint_every=2",
    "train.lr=1e-3",
    "reference.batch_size=16",
    "reference.actors=0",  # the reference, SFT-corpus and validation passes in the calling process (trials' too)
    "generate.actors=0",  # and the validation samples of reward_win_rate
    "tune.space.train.lam=loguniform(0.1, 10)",
    "tune.space.train.beta=choice([0.05, 0.5])",
    "tune.num_samples=2",
    "tune.max_concurrent_trials=1",  # one at a time: the interruption below lands in the second trial
    "tune.validation_rows=16",
]


def _validated_rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [r for f in sorted(folder.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def _interrupt_when(cond, timeout: float = 240.0) -> threading.Thread:
    """SIGUSR1 to this process once ``cond()`` holds: Ray Tune's own graceful stop (it saves the experiment). Never
    sent otherwise (outside ``Tuner.fit`` the signal would end the process)."""

    def watch() -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not cond():
            time.sleep(0.2)
        if cond():
            os.kill(os.getpid(), signal.SIGUSR1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _hold_the_second_trial(trials: Path, held: list[Path]) -> None:
    """Once the first trial has made its run folder, make the second trial's ``config.yaml`` a FIFO. The second
    trial (``trial_<experiment>_00001``) writes that file before anything else of its pipeline, and opening a FIFO
    for writing waits for a reader: the trial waits there, held through the filesystem, until the search is
    stopped. (An in-process trial takes ~2 s: without the hold it could report before Tune's stop lands.)"""
    firsts = list(trials.glob("trial_*_00000")) if not held and trials.is_dir() else []
    if firsts:
        second = trials / (firsts[0].name[: -len("00000")] + "00001")
        second.mkdir()
        os.mkfifo(second / "config.yaml")
        held.append(second / "config.yaml")


def test_a_search_links_the_base_selects_on_validation_and_resumes(tmp_path: Path, ray_session) -> None:
    cfg = load_config(None, [f"root={tmp_path}", *TINY])
    prep = rtune.prepare(cfg)
    base, tune_dir = prep.base_dir, prep.base_dir / "tune"
    markers = {p: p.stat().st_mtime_ns for p in sorted(base.glob("*/_SUCCESS"))}
    assert {p.parent.name for p in markers} >= {"synth", "data", "sft", "reference"}
    # The validation pairs: gold-labelled, apart from the train, SFT and eval prompts, validated as training data.
    val_prompts = {json.loads(line)["prompt"] for line in (tune_dir / "validation.jsonl").read_text().splitlines()}
    assert len(val_prompts) == 16 and not val_prompts & synth.split_prompts(base / "synth")
    assert json.loads((tune_dir / "validation" / "data" / "_SUCCESS").read_text())["rows"]["valid"] == 16
    # No trial may read the evaluation prompts: they are away while the trials run (a read would fail the trial).
    eval_split, away = base / "synth" / "eval", tmp_path / "eval-away"
    os.rename(eval_split, away)
    trials = tune_dir / "trials"
    # Stopped once Tune holds the first trial's result (its result.json is created empty when the trial starts):
    # the second trial is then pending, or held at its start (above).
    held: list[Path] = []

    def first_reported() -> bool:
        _hold_the_second_trial(trials, held)
        return any(p.stat().st_size for p in tune_dir.glob("experiment/trial_*/result.json"))

    watcher = _interrupt_when(first_reported)
    with pytest.raises(RuntimeError, match="interrupted; rerun the command to resume"):
        rtune.search(prep)
    watcher.join()
    assert len(held) == 1 and stat.S_ISFIFO(held[0].stat().st_mode)  # the hold was in place, and never passed
    held[0].unlink()
    # The command exits here (and a crash would take its local Ray along); the test restarts Ray the same way, so
    # the resume below starts from what is on disk, as a rerun of the command does.
    ray_session.shutdown()
    ray_session.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    done = [json.loads(p.read_text()) for p in tune_dir.glob("experiment/trial_*/result.json") if p.stat().st_size]
    assert len(done) == 1  # the first trial reported; the second was stopped before it could
    first = Path(done[0]["run_dir"])
    first_done = (first / "train" / "_SUCCESS").stat().st_mtime_ns
    best = rtune.search(prep)  # Tuner.restore: the finished trial is kept, the stopped one runs again
    os.rename(away, eval_split)
    assert (first / "train" / "_SUCCESS").stat().st_mtime_ns == first_done
    reported = {}
    for result in (tune_dir / "experiment").glob("trial_*/result.json"):
        lines = result.read_text().splitlines()
        assert len(lines) == 1  # one report per trial, none repeated by the resume
        r = json.loads(lines[0])
        reported[r["trial_id"]] = r
    assert len(reported) == 2
    # tune.metric=auto selected on the reward of the validation samples (the benchmark's gold reward exists).
    # best.json is the argmax of what the trials reported; best.yaml is its full config.
    assert best["metric"] == "reward_win_rate"
    assert best["value"] == max(r["reward_win_rate"] for r in reported.values())
    tied = [r for r in reported.values() if r["reward_win_rate"] == best["value"]]
    assert best["logp_accuracy"] == max(r["logp_accuracy"] for r in tied)  # ties go to the larger log-prob accuracy
    assert reported[best["trial_id"]]["reward_win_rate"] == best["value"] == best["reward_win_rate"]
    assert json.loads((tune_dir / "best.json").read_text())["overrides"] == reported[best["trial_id"]]["config"]
    chosen = load_config(tune_dir / "best.yaml")
    assert chosen.train.lam == best["overrides"]["train.lam"] and chosen.train.beta == best["overrides"]["train.beta"]
    # Each trial is an ordinary run folder: its upstream stages are links into the base, its own train stage.
    for d in trials.iterdir():
        for name in experiment.SHARED:
            if (base / name).exists():
                assert (d / name).is_symlink() and (d / name).resolve() == (base / name).resolve(), name
        assert (d / "config.yaml").is_file() and (d / "train" / "final").is_dir()
        assert not (d / "eval").exists() and not (d / "generations" / "policy").exists()
        assert sorted(p.name for p in (d / "eval_logps").iterdir()) == ["validation"]
    # Rerunning the whole command recomputes nothing: the base's markers and the trials' train stages are untouched.
    trained = {p: p.stat().st_mtime_ns for p in sorted(trials.glob("*/train/_SUCCESS"))}
    again = rtune.run(cfg)
    assert again["trial_id"] == best["trial_id"] and again["value"] == best["value"]
    assert {p: p.stat().st_mtime_ns for p in sorted(trials.glob("*/train/_SUCCESS"))} == trained
    assert {p: p.stat().st_mtime_ns for p in markers} == markers

    # tune.metric=reward_win_rate's measure: the trial policy's samples of the validation prompts against the
    # reference policy's, per prompt, by the gold reward (auto on the benchmark's prompts), computed here by hand.
    from raydora.evaluate import outcomes
    from raydora.generate import read_generations

    trial_dir = Path(best["run_dir"])
    m = rtune.reward_metrics(cfg, trial_dir, base, prep.validation, trial_dir / "train" / "final")
    gens = {}
    for name, folder in (("policy", trial_dir), ("reference", tune_dir)):
        t = read_generations(folder / rtune.SAMPLES)
        gens[name] = dict(zip(t.column("id").to_pylist(), t.column("generations").to_pylist(), strict=True))
    prompts = {r["id"]: r["prompt"] for r in _validated_rows(prep.validation)}
    assert set(gens["policy"]) == set(gens["reference"]) == set(prompts)
    per = []
    for i, p in prompts.items():
        w, t, _ = outcomes([synth.gold_reward(p, x) for x in gens["policy"][i]],
                           [synth.gold_reward(p, x) for x in gens["reference"][i]])  # fmt: skip
        per.append(w + t / 2)
    assert m["reward_win_rate"] == pytest.approx(sum(per) / len(per), abs=1e-12) == best["value"]
    reference_done = (tune_dir / rtune.SAMPLES / "_SUCCESS").stat().st_mtime_ns
    assert rtune.reward_metrics(cfg, trial_dir, base, prep.validation, trial_dir / "train" / "final") == m
    assert (tune_dir / rtune.SAMPLES / "_SUCCESS").stat().st_mtime_ns == reference_done  # sampled once


def test_trials_wait_for_workers_while_other_runs_stop_after_max_failures(tmp_path: Path, ray_session) -> None:
    # Ray Train's retries of a worker group it cannot place: bounded by train.max_failures (a lost node stops the
    # run, tests/test_cluster.py), but not in a Tune trial, whose trainers queue for each other's CPUs.
    from ray import tune as ray_tune

    from raydora.cluster import placement_retries

    def trainable(config: dict) -> None:
        ray_tune.report({"retries": placement_retries(config["max_failures"])})

    grid = ray_tune.Tuner(
        ray_tune.with_resources(trainable, {"cpu": 0.01}),
        param_space={"max_failures": ray_tune.grid_search([0, 3])},
        run_config=ray_tune.RunConfig(storage_path=str(tmp_path), name="retries"),
    ).fit()
    assert sorted(r.metrics["retries"] for r in grid) == [-1, -1]
    assert placement_retries(0) == 0 and placement_retries(3) == 3  # here, outside a trial (ray.tune imported)
