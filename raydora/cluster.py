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
