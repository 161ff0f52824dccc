"""Experiments over many runs: the method table of the offline shift benchmark, runs that share one base run's
upstream stages, and a two-level bootstrap interval for a mean over seeds.

**Shared upstream stages.** Runs that differ only downstream (another objective, another lr, another seed of the
trainer) need not each redo synth, validate, classify, SFT and the reference pass. A *base* run does them once
(``BASE_STAGES``). A *child* run is a sibling run folder whose upstream stage folders are relative symlinks into the
base's (``link_shared``); it then runs only its own stages. Markers fingerprint files by names relative to their
folder (``rundir.file_fingerprints``), so a linked stage still matches its ``_SUCCESS`` marker, counts as done and is
never rewritten; a relative link survives moving the whole experiment folder. A ``ChildPlan`` names the shared
folders a child computes itself (``own``: not linked) and the stages it runs:

- ``REUSE_UPSTREAM``: every shared folder linked; the child trains, samples and evaluates (a method, a
  hyperparameter trial);
- ``OWN_CLASSIFIERS``: its own classify (and scoring) and reference pass: a change to ``classifier.*``;
- ``OWN_DATA``: its own validate and reference pass on other rows or labels (the oracle's gold-ranked split).

``run_child`` links and runs one child; ``child_plan`` picks the plan of a method of ``METHODS``::

    from raydora import experiment, pipeline
    from raydora.config import load_config

    over = [f"root={root}", "seed=0"]
    base = load_config(config, [*over, "name=base"])
    pipeline.run(base, experiment.BASE_STAGES)
    for method in ("erm", "dora", "kldpo"):
        child = load_config(config, [*over, f"name={method}", *experiment.method_overrides(method, 0.0)])
        experiment.run_child(child, base.run_dir, experiment.child_plan(method))

A child may live anywhere (the links are relative), but it must keep every setting that its linked stages depend
on (the data, the classifier and SFT settings, the seed): a child whose upstream settings differ from its base's is
not detected here; it would reuse the base's outputs as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raydora.rundir import read_success

if TYPE_CHECKING:
    from raydora.config import RunConfig

__all__ = [
    "BASE_STAGES",
    "DOWNSTREAM",
    "METHODS",
    "OWN_CLASSIFIERS",
    "OWN_DATA",
    "REUSE_UPSTREAM",
    "SHARED",
    "ChildPlan",
    "child_plan",
    "link_shared",
    "method_overrides",
    "run_child",
    "two_level_ci",
]

# ---- the method table -------------------------------------------------------------------------------------------
# Per method: config overrides of the child run. Pairwise methods use DPO on the best-vs-worst pair of each row.
PAIRWISE: dict[str, dict[str, Any]] = {
    "erm": {"train.objective": "erm"},
    "reweight": {"train.objective": "reweight"},
    "kl_dro": {"train.objective": "kl_dro"},
    "dora": {"train.objective": "dora"},
    "kldpo": {"train.objective": "kldpo", "train.kldpo_normalize": True},
    "kldpo_raw": {"train.objective": "kldpo", "train.kldpo_normalize": False, "train.kldpo_clip": 10.0},
    "wdpo": {"train.objective": "wdpo"},
    "rdpo": {"train.loss": "rdpo", "train.objective": "erm"},
    "dr_dpo": {"train.objective": "dr_dpo"},
    # Robustness strength: the defaults above (lam = tau = 1, rho = 0.01) and a 10x stronger setting each.
    "kl_dro_lam01": {"train.objective": "kl_dro", "train.lam": 0.1},
    "kldpo_tau01": {"train.objective": "kldpo", "train.kldpo_normalize": True, "train.tau": 0.1},
    "wdpo_rho01": {"train.objective": "wdpo", "train.rho": 0.1},
    # DoRA with Platt-calibrated classifiers (a bias besides the temperature): its own classify and reference.
    "dora_platt": {"train.objective": "dora", "classifier.calibration": "platt"},
}
# Listwise losses on all K responses, each alone and under DoRA.
LISTWISE: dict[str, dict[str, Any]] = {
    f"{loss}{'+dora' if dora else ''}": {"train.loss": loss, "train.objective": "dora" if dora else "erm"}
    for loss in ("dpo_pl", "rrhf", "lire")
    for dora in (False, True)
}
# DPO on the same rows ranked by gold (the benchmark's ``oracle`` split): the upper bound.
ORACLE: dict[str, dict[str, Any]] = {"oracle": {"train.objective": "erm"}}
METHODS: dict[str, dict[str, Any]] = {**PAIRWISE, **LISTWISE, **ORACLE}


def method_overrides(method: str, noise: float) -> list[str]:
    """The dotted config overrides (``key=json value``) of ``METHODS[method]`` at label noise ``noise``: rDPO also
    gets its flip rate, about ``noise / 2`` (shuffling a row's K scores flips its best-vs-worst pair with
    probability about 1/2), at least 0.1 (the config default, for no noise)."""
    over = [f"{k}={json.dumps(v)}" for k, v in METHODS[method].items()]
    if method == "rdpo":
        over.append(f"train.flip_rate={max(0.1, noise / 2)}")
    return over


# ---- runs that share a base run's upstream stages ---------------------------------------------------------------
# What a base run computes for its children: everything upstream of training, and the SFT policy's samples.
BASE_STAGES: tuple[str, ...] = ("synth", "validate", "classify", "sft", "reference", "generate")
# A base run's folders that a child may link (stage outputs, and the SFT samples a child's evaluation compares with).
SHARED: tuple[str, ...] = (
    "synth",
    "tokenizer",
    "init",
    "data",
    "quarantine",
    "classifier",
    "scored",
    "sft",
    "sft_data",
    "reference",
    "generations/sft",
)


@dataclass(frozen=True)
class ChildPlan:
    """How a child run uses its base: the ``SHARED`` folders it computes itself (``own``, not linked) and the
    ``stages`` it runs, in order."""

    own: tuple[str, ...]
    stages: tuple[str, ...]

    @property
    def linked(self) -> tuple[str, ...]:
        """The ``SHARED`` folders linked from the base: all but ``own``."""
        return tuple(name for name in SHARED if name not in self.own)


DOWNSTREAM = ("train", "generate", "evaluate")
REUSE_UPSTREAM = ChildPlan(own=(), stages=DOWNSTREAM)
OWN_CLASSIFIERS = ChildPlan(own=("classifier", "scored", "reference"), stages=("classify", "reference", *DOWNSTREAM))
OWN_DATA = ChildPlan(
    own=("data", "quarantine", "scored", "classifier", "reference"), stages=("validate", "reference", *DOWNSTREAM)
)


def child_plan(method: str) -> ChildPlan:
    """The plan of a ``METHODS`` child: the oracle validates its own (gold-ranked) rows, a method that calibrates the
    classifiers its own way classifies again, every other one reuses everything upstream."""
    if method == "oracle":
        return OWN_DATA
    if "classifier.calibration" in METHODS[method]:
        return OWN_CLASSIFIERS
    return REUSE_UPSTREAM


def link_shared(base: str | Path, child: str | Path, names: Iterable[str] = SHARED) -> list[Path]:
    """Make each of ``names`` (folders relative to a run folder) in ``child`` a relative symlink to the same folder in
    ``base``, where the base has it and the child does not yet (so a resumed child keeps what it has). Returns the
    links made."""
    base, child = Path(base), Path(child)
    made: list[Path] = []
    for name in names:
        src, dst = base / name, child / name
        if src.exists() and not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(os.path.relpath(src, dst.parent))
            made.append(dst)
    return made


def run_child(cfg: RunConfig, base: str | Path, plan: ChildPlan = REUSE_UPSTREAM, *, done: str | None = "eval") -> Path:
    """Run ``cfg`` as a child of the finished run folder ``base``: link ``plan.linked`` from it into ``cfg.run_dir``,
    then run ``plan.stages`` on Ray, unless the child's ``done`` folder already holds a ``_SUCCESS`` marker (None:
    always call the pipeline, which skips the stages that are up to date). Returns the child's run folder."""
    run_dir = Path(cfg.run_dir)
    link_shared(base, run_dir, plan.linked)
    if done is None or read_success(run_dir / done) is None:
        from raydora import pipeline  # Ray: only when there is something to run

        pipeline.run(cfg, plan.stages)
    return run_dir


# ---- statistics -------------------------------------------------------------------------------------------------
def two_level_ci(groups: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean, resampling groups (seeds) and then values (prompts) within each, so the
    interval carries the group-to-group spread as well as the sampling within a group. Empty groups are left out."""
    rng = np.random.default_rng(seed)
    arrays = [np.asarray(g, dtype=np.float64) for g in groups if len(g)]
    means = np.empty(resamples)
    for b in range(resamples):
        picks = rng.integers(0, len(arrays), size=len(arrays))
        means[b] = np.mean([arrays[j][rng.integers(0, arrays[j].size, size=arrays[j].size)].mean() for j in picks])
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]
