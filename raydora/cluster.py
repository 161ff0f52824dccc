"""Starting or joining Ray: one place, so every stage and test gets the same behaviour."""

from __future__ import annotations

import os

from raydora.config import RayConfig


def init_ray(cfg: RayConfig | None = None) -> None:
    """Join the cluster of the current Ray job (``RAY_ADDRESS``) or ``cfg.address``, else start a local Ray.

    A local Ray binds its dashboard to ``cfg.dashboard_host`` (127.0.0.1 by default). Idempotent."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.num_cpus, dashboard_host=cfg.dashboard_host)


def resolve_device(setting: str) -> str:
    """``auto`` is CUDA when this process sees a GPU or the Ray cluster has one (a CPU head node drives GPU
    workers on KubeRay), else CPU."""
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        return "cuda"
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
