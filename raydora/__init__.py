"""raydora: Ray-native distributionally robust preference alignment of language models.

The public API (docs/design.md), imported on first use so that ``import raydora`` (and the pure modules
``raydora.losses``, ``raydora.robust``, ``raydora.logprobs``) never pulls in Ray::

    import raydora

    cfg = raydora.load_config("jobs/configs/demo_cpu.yaml", ["train.objective=dora", "train.lam=0.5"])
    results = raydora.run_pipeline(cfg)                 # every stage, in order (StageResult each)
    raydora.run_stage(cfg, "train", force=True)         # one stage
    raydora.robust.dora(losses, weights, lam=1.0)       # the math, on your own tensors

    # One optimizer step of the trainer on your own model (no Ray): collate rows, forward, backward.
    step_cfg = raydora.StepConfig("preference", cfg.train, batch_size=8, micro_batch_size=4)
    micro = [raydora.collate_micro(rows, slice(i, i + 4), "preference", "dpo", pad_id, None) for i in (0, 4)]
    stats = raydora.train_step(model, micro, step_cfg)   # .grad holds the global batch's gradient
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from raydora import calibration, logprobs, losses, robust
    from raydora.config import ConfigError, RunConfig, TrainConfig, load_config
    from raydora.rundir import StageResult
    from raydora.step import StepConfig, collate_micro, train_step

_LAZY = {
    "RunConfig": ("raydora.config", "RunConfig"),
    "ConfigError": ("raydora.config", "ConfigError"),
    "load_config": ("raydora.config", "load_config"),
    "StageResult": ("raydora.rundir", "StageResult"),
    "TrainConfig": ("raydora.config", "TrainConfig"),
    "StepConfig": ("raydora.step", "StepConfig"),
    "collate_micro": ("raydora.step", "collate_micro"),
    "train_step": ("raydora.step", "train_step"),
    "losses": ("raydora.losses", None),
    "robust": ("raydora.robust", None),
    "logprobs": ("raydora.logprobs", None),
    "calibration": ("raydora.calibration", None),
}
__all__ = [
    "STAGE_NAMES",
    "ConfigError",
    "RunConfig",
    "StageResult",
    "StepConfig",
    "TrainConfig",
    "__version__",
    "calibration",
    "collate_micro",
    "load_config",
    "logprobs",
    "losses",
    "robust",
    "run_pipeline",
    "run_stage",
    "train_step",
]

# The stage names, in pipeline order (raydora.pipeline.STAGES holds the functions).
STAGE_NAMES = ("synth", "validate", "classify", "sft", "reference", "train", "generate", "evaluate")


def run_pipeline(cfg: RunConfig, stages: Sequence[str] | None = None) -> list[StageResult]:
    """Run ``stages`` (default: every stage the config needs) of ``cfg`` on Ray (``ray.address`` or a local Ray),
    each skipped when its outputs are up to date; returns one ``StageResult`` per stage run."""
    from raydora import pipeline

    return pipeline.run(cfg, stages)


def run_stage(cfg: RunConfig, stage: str, *, force: bool = False) -> StageResult:
    """Run one stage (a name of ``STAGE_NAMES``) over ``cfg.run_dir``, on Ray; ``force`` redoes it even when its
    outputs are up to date."""
    from raydora import pipeline
    from raydora.cluster import init_ray
    from raydora.config import dump_yaml
    from raydora.paths import resolve_model_paths

    if stage not in pipeline.STAGES:
        raise ValueError(f"unknown stage {stage!r}; known, in order: {', '.join(pipeline.STAGES)}")
    cfg = resolve_model_paths(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    init_ray(cfg.ray)
    return pipeline.STAGES[stage](cfg, cfg.run_dir, force=force)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'raydora' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)
