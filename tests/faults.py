"""Faults for the training tests, injected through ``train.WorkerOptions.callbacks``: the production loop calls
its step callbacks and knows nothing of faults. They travel to the Ray Train workers pickled by value, so the
workers need not import this test folder."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray import cloudpickle

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclasses.dataclass(frozen=True)
class CrashOnce:
    """A hard crash (``os._exit``, no cleanup) of the last worker before step ``step``, once: ``marker`` records
    that it happened, so the group Ray Train restarts from the last checkpoint runs on."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int, world: int, micro: list[dict[str, Any]]) -> None:
        if step == self.step and rank == world - 1 and not Path(self.marker).exists():
            Path(self.marker).write_text("failed once")
            os._exit(1)


@dataclasses.dataclass(frozen=True)
class RaiseOnce:
    """An exception before step ``step``, once (``marker``): a crash that a training loop running in this process
    (``num_workers=0``) can survive, where :class:`CrashOnce` would end the test process."""

    step: int
    marker: str

    def __call__(self, step: int, rank: int, world: int, micro: list[dict[str, Any]]) -> None:
        if step == self.step and not Path(self.marker).exists():
            Path(self.marker).write_text("raised once")
            raise RuntimeError(f"injected failure before step {step}")


@dataclasses.dataclass(frozen=True)
class PoisonStep:
    """NaN reference log-probs in every micro-batch of step ``step`` on every worker: the loss is NaN, as it is
    when garbage reaches training."""

    step: int

    def __call__(self, step: int, rank: int, world: int, micro: list[dict[str, Any]]) -> None:
        if step == self.step:
            for mb in micro:
                mb["ref"] = mb["ref"] * float("nan")


@dataclasses.dataclass(frozen=True)
class SlowSteps:
    """A pause of ``seconds`` before every step on every worker: steps long enough for a fault from outside (a node
    drained, a node lost) to land while the run is in the middle of its steps."""

    seconds: float

    def __call__(self, step: int, rank: int, world: int, micro: list[dict[str, Any]]) -> None:
        time.sleep(self.seconds)
