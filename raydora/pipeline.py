"""Run the stages in order over one run directory. Each stage skips itself when its outputs are up to date."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from raydora import classify, evaluate, generate, reference, sft, synth, train, validate
from raydora.cluster import init_ray
from raydora.config import P_GOLDEN_OBJECTIVES, RunConfig, dump_yaml
from raydora.paths import resolve_model_paths
from raydora.rundir import StageResult


class Stage(Protocol):
    """What every stage is: ``run(cfg, run_dir, *, force=False) -> StageResult``. It reads its inputs from earlier
    stages' folders under ``run_dir``, skips itself when its ``_SUCCESS`` fingerprint matches (unless ``force``),
    and writes its folder atomically (``rundir.staging``)."""

    def __call__(self, cfg: RunConfig, run_dir: Path, /, *, force: bool = False) -> StageResult: ...


# In pipeline order.
STAGES: dict[str, Stage] = {
    "synth": synth.run,
    "validate": validate.run,
    "classify": classify.run,
    "sft": sft.run,
    "reference": reference.run,
    "train": train.run,
    "generate": generate.run,
    "evaluate": evaluate.run,
}


def run(cfg: RunConfig, stages: Sequence[str] | None = None) -> list[StageResult]:
    """Run ``stages`` (default: all) of ``cfg`` on Ray, writing ``<root>/<name>/config.yaml`` first."""
    names = list(stages or STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; known, in order: {', '.join(STAGES)}")
    if cfg.data.input is not None and "synth" in names and stages is None:
        names.remove("synth")  # real data given: nothing to synthesise
    if stages is None and cfg.train.objective not in P_GOLDEN_OBJECTIVES:
        names.remove("classify")  # nothing reads p_golden, and the data may have no golden source to classify
        print(f"[classify] not needed: train.objective={cfg.train.objective} does not use p_golden", flush=True)
    cfg = resolve_model_paths(cfg)  # a policy name that is neither a folder nor cached fails before any work
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    init_ray(cfg.ray)
    results = []
    for name in names:
        start = time.perf_counter()
        result = STAGES[name](cfg, run_dir)
        result.info.setdefault("seconds", round(time.perf_counter() - start, 1))
        print(f"{result.summary()} ({result.info['seconds']} s)", flush=True)
        report(result)
        results.append(result)
    return results


def report(result: StageResult) -> None:
    """The validate stage's quarantine reasons; the evaluate stage's win-rate table and where its report is."""
    if result.stage == "validate":
        for reason, n in sorted(result.info.get("reasons", {}).items()):
            print(f"  quarantined {n:>8}  {reason}", flush=True)
    if result.stage == "evaluate" and result.info.get("table"):
        print(result.info["table"])
        if result.info.get("heldout"):
            print(result.info["heldout"])
        plots = [p for p in ("winrate.png", "reward_vs_alpha.png") if (Path(result.outputs["eval"]) / p).is_file()]
        print(
            f"report: {result.outputs['eval']}/report.md" + (f" (plots: {', '.join(plots)})" if plots else ""),
            flush=True,
        )
