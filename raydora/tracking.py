"""Where the training workers' rank 0 sends each step's metrics: ``metrics.jsonl`` always, TensorBoard when it is
installed, and MLflow and Weights & Biases when the ``logging`` section configures them (docs/training.md,
"Experiment tracking"). Every backend gets the same metrics at the same step.

The MLflow run id and W&B run id are kept in ``tracking.json`` beside ``metrics.jsonl``, so a run that Ray Train
restarts from a checkpoint, or that a rerun resumes, keeps logging to the same tracked run.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
STATE_FILE = "tracking.json"
# config key -> (module to import, what to pip install)
PACKAGES = {"mlflow_uri": ("mlflow", "mlflow-skinny (or mlflow)"), "wandb_project": ("wandb", "wandb")}


def settings(cfg: Any) -> dict[str, Any] | None:
    """The worker's view of a ``LoggingConfig`` (a plain dict), or None when no backend is configured. Fails here,
    on the driver before any worker starts, when a configured backend's package is not installed. ``wandb_mode``
    null takes the driver's ``WANDB_MODE``, which a worker on another node would not see."""
    if cfg is None or not (cfg.mlflow_uri or cfg.wandb_project):
        return None
    from raydora.config import ConfigError

    for key, (module, pip) in PACKAGES.items():
        if getattr(cfg, key) and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"logging.{key}", f"is set ({getattr(cfg, key)!r}) but {module} is not installed: pip install {pip}"
            )
    out = dataclasses.asdict(cfg)
    if cfg.wandb_project and cfg.wandb_mode is None:
        out["wandb_mode"] = os.environ.get("WANDB_MODE")
    return out


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.0001", ...}``: a nested config as dotted keys and string values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = (
                json.dumps(value) if isinstance(value, (list, tuple, bool)) or value is None else str(value)
            )
    return out


def tensorboard(folder: Path) -> Any:
    """A TensorBoard writer when ``tensorboard`` (or ``tensorboardX``) is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        pass
    else:
        return SummaryWriter(str(folder), flush_secs=10)
    try:
        from tensorboardX import SummaryWriter as XSummaryWriter
    except ImportError:
        return None
    return XSummaryWriter(str(folder), flush_secs=10)


def truncate_metrics(path: Path, start: int) -> None:
    """Keep the metric lines of steps <= ``start`` (a resumed run rewrites the later ones)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    path.write_text("".join(x + "\n" for x in keep))


class Tracker:
    """Fans each step's metrics out to ``out_dir/metrics.jsonl``, TensorBoard (``out_dir/tensorboard``), and the
    MLflow and W&B runs that ``logging`` (the dict of :func:`settings`, or None) asks for. ``params``: the run's
    config (nested dict), logged once per tracked run. Resumes at ``start`` (later metric lines are dropped)."""

    def __init__(
        self, out_dir: Path, start: int, logging: dict[str, Any] | None, params: dict[str, Any] | None, name: str
    ) -> None:
        self.out_dir = Path(out_dir)
        self.metrics_path = self.out_dir / METRICS_FILE
        truncate_metrics(self.metrics_path, start)
        self.writer = tensorboard(self.out_dir / "tensorboard")
        self.mlflow: Any = None
        self.mlflow_run: str | None = None
        self.mlflow_names: dict[str, str] = {}  # metric key -> MLflow metric name
        self.mlflow_file_store = False
        self.wandb: Any = None
        logging = logging or {}
        state_path = self.out_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        flat = flat_params(params or {})
        if logging.get("mlflow_uri"):
            self.mlflow, self.mlflow_run = _mlflow_run(logging, state.get("mlflow_run_id"), flat, name, self.out_dir)
            self.mlflow_file_store = is_file_store(logging["mlflow_uri"])
            state["mlflow_run_id"] = self.mlflow_run
        if logging.get("wandb_project"):
            self.wandb = _wandb_run(logging, state.get("wandb_id"), params or {}, name, self.out_dir)
            state["wandb_id"] = self.wandb.id
        if state:
            state_path.write_text(json.dumps(state) + "\n")

    def mlflow_name(self, key: str) -> str:
        """The MLflow name of metric ``key``: the same, except in the file store, which keeps each metric in a
        file named after it (``loss`` is a file, so ``loss/unweighted`` cannot be one): there ``/`` becomes ``.``."""
        return key.replace("/", ".") if self.mlflow_file_store else key

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One step's metrics to every backend. metrics.jsonl is the record: a failing MLflow or W&B (a server
        gone away) is reported once and dropped rather than stopping the training run."""
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        if self.mlflow is not None:
            try:
                from mlflow.entities import Metric

                now = int(time.time() * 1000)
                values = [
                    Metric(self.mlflow_name(k), float(v), now, step)
                    for k, v in metrics.items()
                    if isinstance(v, (int, float))
                ]
                self.mlflow.log_batch(self.mlflow_run, metrics=values)
            except Exception as e:  # noqa: BLE001 - tracking must not end a training run
                print(f"[train] MLflow logging failed at step {step}, no more MLflow logging this run: {e}", flush=True)
                self.mlflow = None
        if self.wandb is not None:
            try:
                self.wandb.log(dict(metrics), step=step)
            except Exception as e:  # noqa: BLE001
                print(f"[train] W&B logging failed at step {step}, no more W&B logging this run: {e}", flush=True)
                self.wandb = None

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.mlflow is not None:
            self.mlflow.set_terminated(self.mlflow_run, "FAILED" if failed else "FINISHED")
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def is_file_store(uri: str) -> bool:
    """A ``file:`` URI or a plain path (MLflow's file store); not ``databricks``, ``sqlite://``, ``http://``..."""
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


def _mlflow_run(
    logging: dict[str, Any], run_id: str | None, params: dict[str, str], name: str, out_dir: Path
) -> tuple[Any, str]:
    """``(client, run id)``: the run ``run_id`` when the store still has it, else a new run with ``params``."""
    uri = logging["mlflow_uri"]
    if is_file_store(uri):
        # MLflow 3 keeps its file store in maintenance mode and refuses it unless told: a file URI asks for it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if run_id is not None:
        try:
            client.get_run(run_id)
            return client, run_id
        except MlflowException:
            pass  # another store, or the run was deleted: start a new one
    name_ = logging["mlflow_experiment"]
    experiment = client.get_experiment_by_name(name_)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(name_)
        except MlflowException:  # created meanwhile by another run
            created = client.get_experiment_by_name(name_)
            if created is None:
                raise
            experiment_id = created.experiment_id
    run = client.create_run(experiment_id, run_name=name, tags={"raydora.out_dir": str(out_dir)})
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return client, run.info.run_id


def _wandb_run(logging: dict[str, Any], run_id: str | None, params: dict[str, Any], name: str, out_dir: Path) -> Any:
    import wandb

    return wandb.init(
        project=logging["wandb_project"],
        entity=logging.get("wandb_entity"),
        mode=logging.get("wandb_mode") or None,
        name=name,
        id=run_id or wandb.util.generate_id(),
        resume="allow",
        config=params,
        dir=str(out_dir),
    )
