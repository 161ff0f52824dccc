"""Starting or joining Ray: one place, so every stage and test gets the same behaviour."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raydora.config import RayConfig

PACKAGE_DIR = Path(__file__).resolve().parent  # the raydora package this process runs


def shadowing_dirs(cwd: str | Path | None = None) -> list[str]:
    """The folders Ray puts first on its workers' ``sys.path`` (the driver's working directory, and its script's
    folder when that is on the driver's path) that hold a ``raydora`` folder or ``raydora.py`` other than this
    package. In a worker, such a folder would be imported as ``raydora`` instead of the installed package: an
    empty ``raydora/`` (or a checkout's root, run from its parent) as a namespace package, a stale copy of the
    package as itself, with errors like ``cannot import name 'check_gpus' from 'raydora.cluster' (unknown
    location)`` far from their cause."""
    candidates = [Path(cwd) if cwd is not None else Path.cwd()]
    script = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] not in ("", "-c", "-m") else None
    if script is not None and str(script) in sys.path:
        candidates.append(script)
    found: list[str] = []
    for folder in candidates:
        # A folder or a module: the console script ``bin/raydora`` (no suffix) is neither and is never imported.
        local = (folder / "raydora").is_dir() and (folder / "raydora").resolve() != PACKAGE_DIR
        if (local or (folder / "raydora.py").is_file()) and str(folder.resolve()) not in found:
            found.append(str(folder.resolve()))
    return found


def _import_package_first(shadows: list[str]) -> Callable[[], None]:
    """A Ray ``worker_process_setup_hook``: imports ``raydora`` with the ``shadows`` left off ``sys.path``, so that
    the real package is in ``sys.modules`` before Ray adds the driver's folders to the path (it does so at the
    worker's first task); ``raydora.<module>`` then resolves inside that package. A closure, so Ray ships it by
    value: a hook named by module path would itself be imported through the shadowing folder. Never fails a
    worker: without an importable package the worker runs as it would have."""

    def hook() -> None:
        import importlib
        import os
        import sys

        saved = list(sys.path)
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) not in shadows]
        try:
            importlib.import_module("raydora")
        except Exception:  # noqa: BLE001 - best effort: the worker's own import errors will say what is wrong
            pass
        finally:
            sys.path[:] = saved

    return hook


def package_guard(cwd: str | Path | None = None) -> dict[str, Any]:
    """``ray.init`` keyword arguments that keep a local ``raydora`` folder from shadowing the package in the
    workers (see :func:`shadowing_dirs`); empty when nothing shadows it, so the usual start is untouched."""
    shadows = shadowing_dirs(cwd)
    if not shadows:
        return {}
    print(
        f"[ray] {', '.join(str(Path(s) / 'raydora') for s in shadows)} is not the raydora package this process "
        f"runs ({PACKAGE_DIR}); Ray workers put that folder first on sys.path, so raydora makes them import the "
        "package first",
        flush=True,
    )
    return {"runtime_env": {"worker_process_setup_hook": _import_package_first(shadows)}}


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster of the current Ray job (``RAY_ADDRESS``) or ``cfg.address``, else start a local Ray.

    A local Ray binds its dashboard to ``cfg.dashboard_host`` (127.0.0.1 by default). A ``raydora`` folder in the
    working directory that is not the package does not shadow it in the workers (:func:`package_guard`).
    Idempotent."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    guard = package_guard()
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address, log_to_driver=True, **guard)
        return
    ray.init(num_cpus=cfg.num_cpus, dashboard_host=cfg.dashboard_host, **guard)


def resolve_device(setting: str, *, here: bool = False) -> str:
    """``auto`` is CUDA when this process sees a GPU or the Ray cluster has one (a CPU head node drives GPU
    workers on KubeRay), else CPU. ``here``: the model runs in this process (``actors=0``), so only this process's
    GPUs count."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if here:
        return "cpu"
    import ray

    return "cuda" if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def check_pool_fits(
    actors: int, actor_cpus: float, keys: tuple[str, str], io_cpus: float = 0.25, gpus: float = 0
) -> None:
    """Fail fast, naming the config ``keys`` (for the actor count and the CPUs per actor), when an actor pool of
    ``actors`` x ``actor_cpus`` would leave no CPU for the read and write tasks that feed it (a Ray Data pipeline
    that would otherwise wait forever), or asks for more GPUs than the cluster has."""
    import ray

    total = ray.cluster_resources()
    cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if actors * actor_cpus + io_cpus > cpus + 1e-9:
        raise ValueError(
            f"{keys[0]}={actors} x {keys[1]}={actor_cpus} leaves less than {io_cpus} of the cluster's {cpus:g} "
            f"CPUs for the tasks that read and write the data: lower {keys[1]} or {keys[0]}"
        )
    check_gpus(actors, gpus, keys[0], have_gpus)


def check_gpus(workers: int, per_worker: float, key: str, have: float | None = None) -> None:
    """Fail fast, naming ``key``, when ``workers`` x ``per_worker`` GPUs exceed the cluster's (``have``, or asked
    of Ray): Ray would otherwise wait for them forever."""
    if have is None:
        import ray

        have = ray.cluster_resources().get("GPU", 0.0)
    if workers * per_worker > have + 1e-9:
        need = workers * per_worker
        raise ValueError(f"{key}={workers} GPU workers need {need:g} GPUs; the Ray cluster has {have:g} GPUs")


class WorkersNotPlacedError(RuntimeError):
    """Ray Train could not place the training workers (a lost node not replaced, a cluster too small for the
    placement strategy) within its start timeout, ``train.max_failures + 1`` times: the run stops rather than wait
    without end, and the same command resumes from the newest checkpoint once the resources are there."""


def fit_or_explain(trainer: Any, mode: str, out_dir: Path, workers: int, strategy: str, tries: int) -> None:
    """``trainer.fit()``; Ray Train's give-up on placing the workers becomes :class:`WorkersNotPlacedError`."""
    import ray.train

    from raydora.checkpoint import latest_checkpoint

    try:
        trainer.fit()
    except getattr(ray.train, "ControllerError", ()) as e:  # Ray Train v2 (Ray 2.5x+)
        if type(e.controller_failure).__name__ != "WorkerGroupStartupTimeoutError":
            raise
        step = latest_checkpoint(out_dir)[0]
        resume = f"it resumes from step {step}" if step else "no checkpoint yet: it starts afresh"
        raise WorkersNotPlacedError(
            f"{mode}: Ray Train could not place {workers} training workers ({strategy}) in {tries + 1} tries "
            f"(train.max_failures={tries}; RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S each): the cluster lacks their "
            f"resources, e.g. a node was lost and not replaced. Once they are back, run the same command: {resume} "
            f"({out_dir})"
        ) from e


def placement_retries(max_failures: int) -> int:
    """How often Ray Train may fail to place a worker group before the run stops: ``max_failures`` times, or without
    end (-1) in a Ray Tune trial, whose trials queue for the cluster's CPUs by design (``tune.max_concurrent_trials
    =0`` starts them all, and their trainers wait for each other's workers)."""
    if "ray.tune" not in sys.modules:
        return max_failures
    import warnings

    from ray import tune

    with warnings.catch_warnings():  # outside a trial, get_context() warns and gives no trial id
        warnings.simplefilter("ignore")
        return -1 if tune.get_context().get_trial_id() is not None else max_failures
