"""The run presets in jobs/configs/: each loads with the project's config loader, the GPU presets carry the papers'
settings and fit the KubeRay cluster in cluster/kuberay/raycluster.yaml, and each says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raydora.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
GPU_PRESETS = {"dora_dpo_llama8b.yaml", "kldpo_llama8b_lora.yaml"}
SHARED = "/mnt/raydora/"


def gpu_cluster() -> tuple[int, int]:
    """(GPUs per pod, GPUs in all pods at maxReplicas) of raycluster.yaml's GPU worker group."""
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())["spec"]
    (group,) = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu-workers"]
    per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    return per_pod, per_pod * group["maxReplicas"]


@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_every_preset_loads(preset: Path) -> None:
    assert isinstance(load_config(preset), RunConfig)


def test_gpu_presets_exist() -> None:
    assert GPU_PRESETS <= {p.name for p in PRESETS}


@pytest.mark.parametrize("name", sorted(GPU_PRESETS))
def test_gpu_preset_runs_on_gpus_with_real_inputs(name: str) -> None:
    cfg = load_config(CONFIGS / name)
    assert cfg.name == Path(name).stem, "a GPU preset's run name is its file name"
    assert cfg.model.precision == "bf16"
    assert cfg.train.use_gpu is True
    assert cfg.reference.device == cfg.generate.device == "cuda"
    assert cfg.generate.backend == "vllm"
    assert cfg.model.trust_remote_code is False
    assert cfg.sft.enabled is False, "the papers start from an SFT / instruction-tuned checkpoint"
    # Real data by local path on the shared volume, nothing synthetic or downloaded.
    for path in (cfg.root, cfg.model.policy, cfg.data.input, cfg.generate.prompts, cfg.evaluate.reward):
        assert path is not None and path.startswith(SHARED), path
    assert cfg.evaluate.reward != "gold", "the gold reward exists only on the synthetic benchmark"
    # The workers and actors fit the GPU group of cluster/kuberay/raycluster.yaml.
    per_pod, total = gpu_cluster()
    assert cfg.train.num_workers <= total
    assert cfg.reference.actors <= total
    assert cfg.generate.actors * cfg.generate.tensor_parallel_size <= total
    assert cfg.generate.tensor_parallel_size <= per_pod, "vLLM's tensor-parallel GPUs must share a pod"


def test_dora_preset_follows_the_dora_paper() -> None:
    cfg = load_config(CONFIGS / "dora_dpo_llama8b.yaml")
    t = cfg.train
    assert (t.loss, t.objective, t.dora_calibration, t.dora_alpha) == ("dpo", "dora", "inside", None)
    assert (t.beta, t.lam, t.batch_size, t.epochs, t.scheduler, t.warmup_ratio) == (0.1, 1.0, 32, 1, "cosine", 0.03)
    assert cfg.model.max_length == 512
    assert (t.strategy, t.num_workers, t.lora_r) == ("fsdp", 16, 0)
    assert cfg.classifier.device == "cuda" and cfg.classifier.backbone.startswith(SHARED)


def test_kldpo_preset_follows_the_wdpo_kldpo_paper() -> None:
    cfg = load_config(CONFIGS / "kldpo_llama8b_lora.yaml")
    t = cfg.train
    assert (t.loss, t.objective, t.kldpo_normalize) == ("dpo", "kldpo", True)
    assert (t.beta, t.tau, t.batch_size, t.grad_clip, t.warmup_ratio) == (0.01, 0.01, 128, 1.0, 0.1)
    assert t.lora_r > 0 and t.num_workers == 8


@pytest.mark.parametrize("name", sorted(GPU_PRESETS))
def test_gpu_preset_says_how_to_run_it(name: str) -> None:
    header = "\n".join(line for line in (CONFIGS / name).read_text().splitlines() if line.startswith("#"))
    assert f"raydora pipeline --config jobs/configs/{name}" in header
    assert "ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml" in header
    assert f"python jobs/pipeline.py --config jobs/configs/{name}" in header
    assert "cluster/kuberay/rayjob.yaml" in header
