"""Experiment tracking (raydora.tracking, the ``logging`` config section): MLflow gets exactly the metrics of
metrics.jsonl; a configured backend that is not installed fails before training, naming the key and the package."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from raydora import tracking
from raydora.config import ConfigError, LoggingConfig, load_config

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install mlflow-skinny (the test extra)")


def _history(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    keys = client.get_run(run_id).data.metrics
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


@pytest.mark.parametrize(("key", "value", "package"), [("wandb_project", "p", "wandb"), ("mlflow_uri", "x", "mlflow")])
def test_a_configured_backend_that_is_not_installed_fails_naming_key_and_package(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str, package: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"^logging\.{key}: is set \('{value}'\) but {package} is not installed: "
                                          rf"pip install {package}"):  # fmt: skip
        tracking.settings(LoggingConfig(**{key: value}))
    assert tracking.settings(LoggingConfig()) is None  # nothing configured: nothing checked, nothing tracked


def test_wandb_mode_defaults_to_the_driver_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "wandb" else real(name, *a))
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.settings(LoggingConfig(wandb_project="p"))["wandb_mode"] == "offline"
    assert tracking.settings(LoggingConfig(wandb_project="p", wandb_mode="disabled"))["wandb_mode"] == "disabled"


def test_the_logging_section_loads_from_overrides() -> None:
    cfg = load_config(None, ["logging.mlflow_uri=file:///tmp/m", "logging.wandb_mode=offline"])
    assert cfg.logging == LoggingConfig(mlflow_uri="file:///tmp/m", wandb_mode="offline")
    with pytest.raises(
        ConfigError, match=r"logging\.wandb_mode: must be online, offline, disabled or null, got 'sometimes'"
    ):
        load_config(None, ["logging.wandb_mode=sometimes"])


def test_tracker_resumes_the_same_mlflow_run(tmp_path: Path) -> None:
    """A restarted worker (Ray Train failure, or a rerun that resumes) keeps logging to the run it started, and
    metrics.jsonl drops the lines after the checkpoint it resumes from."""
    uri = (tmp_path / "mlruns").as_uri()
    logging = tracking.settings(LoggingConfig(mlflow_uri=uri))
    params = {"seed": 0, "train": {"lr": 0.001, "alphas": [0.0, 1.0], "lora": None}}
    first = tracking.Tracker(tmp_path, 0, logging, params, "demo/train")
    for step in (1, 2, 3):
        first.log({"step": step, "loss": 1.0 / step}, step)
    second = tracking.Tracker(tmp_path, 2, logging, params, "demo/train")  # resumed from the step-2 checkpoint
    second.log({"step": 3, "loss": 0.25}, 3)
    second.close()
    assert second.mlflow_run == first.mlflow_run
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    assert _history(uri, first.mlflow_run)["loss"] == {1: 1.0, 2: 0.5, 3: 0.25}  # the last value of step 3
    run = mlflow.tracking.MlflowClient(tracking_uri=uri).get_run(first.mlflow_run)
    assert run.info.status == "FINISHED" and run.info.run_name == "demo/train"
    assert run.data.params == {"seed": "0", "train.lr": "0.001", "train.alphas": "[0.0, 1.0]", "train.lora": "null"}


def test_a_failing_backend_is_dropped_not_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tracker = tracking.Tracker(tmp_path, 0, tracking.settings(LoggingConfig(mlflow_uri=str(tmp_path / "m"))), {}, "x")

    def gone(*args, **kwargs):
        raise ConnectionError("server gone")

    tracker.mlflow.log_batch = gone
    tracker.log({"step": 1, "loss": 1.0}, 1)
    tracker.log({"step": 2, "loss": 0.5}, 2)
    tracker.close()
    assert tracker.mlflow is None
    assert capsys.readouterr().out.count("MLflow logging failed at step 1, no more MLflow logging this run") == 1
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_training_logs_its_metrics_and_config_to_mlflow(tmp_path: Path, ray_session) -> None:
    """A 3-step run on one worker with logging.mlflow_uri set: the MLflow run holds every metric of every step of
    metrics.jsonl, equal to the float, and the run's config as params."""
    from raydora import reference, synth, train, validate

    uri = (tmp_path / "mlruns").as_uri()
    cfg = load_config(None, [
        f"root={tmp_path}", "name=tracked", "synth.rows=32", "synth.k=2", "synth.eval_rows=4", "model.policy=tiny-gpt2",
        "model.precision=fp32", "model.max_length=48", "sft.enabled=false", "train.objective=erm", "train.loss=dpo",
        "train.batch_size=4", "train.micro_batch_size=4", "train.num_workers=0", "train.max_steps=3",
        "train.checkpoint_every=100", f"logging.mlflow_uri={uri}", "logging.mlflow_experiment=tiny",
    ])  # fmt: skip
    run_dir = cfg.run_dir.absolute()
    for stage in (synth.run, validate.run, reference.run):
        stage(cfg, run_dir)
    one_worker = dataclasses.replace(cfg.train, num_workers=0)  # the training loop runs in this process
    train.fit(mode="train", data_dir=run_dir / "reference", model_dir=reference.initial_policy(cfg, run_dir),
              out_dir=run_dir / "train", run_cfg=cfg, train=one_worker)  # fmt: skip
    lines = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    run_id = json.loads((run_dir / "train" / tracking.STATE_FILE).read_text())["mlflow_run_id"]
    history = _history(uri, run_id)
    # every key, every step, the same value (named with "." for "/": the file store keeps a file per metric)
    expected = {k.replace("/", "."): {m["step"]: float(m[k]) for m in lines} for k in lines[0]}
    assert history == expected
    assert {"loss", "loss.unweighted", "rewards.margins", "grad_norm", "lr"} <= set(history)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked/train"
    assert client.get_experiment(run.info.experiment_id).name == "tiny"
    assert run.data.params["train.objective"] == "erm" and run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["logging.mlflow_uri"] == uri and run.data.params["seed"] == "0"
