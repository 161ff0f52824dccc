"""The ``tune`` config section (``raydora tune``, docs/tune.md) and its search-space strings.

Pure: stdlib and PyYAML only, so :mod:`raydora.config` registers the section without importing Ray. Each entry of
``tune.space`` maps a ``train.*`` key to a distribution string, parsed here into a :class:`Distribution`;
:mod:`raydora.tune` turns it into Ray Tune's own sampler (``tune.loguniform`` ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from raydora.typedconf import ConfigError

# name -> what its arguments are; the samplers are Ray Tune's of the same name.
DISTRIBUTIONS = {
    "uniform": "uniform(low, high): a float, low < high",
    "loguniform": "loguniform(low, high): a float, uniform in log space, 0 < low < high",
    "randint": "randint(low, high): an integer in [low, high), low < high",
    "choice": "choice([a, b, ...]): one of the listed values (numbers, strings, true/false)",
}
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)
# A number in exponent form without a dot (1e-4): YAML 1.1, PyYAML's, reads it as a string.
_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _number(value: Any) -> Any:
    """``value``, or the float a string such as ``"1e-4"`` spells."""
    return float(value) if isinstance(value, str) and _EXPONENT.match(value) else value


@dataclass(frozen=True)
class Distribution:
    """One parsed ``tune.space`` entry: ``kind`` (a key of :data:`DISTRIBUTIONS`) and its arguments (``choice``:
    the values; the others: ``(low, high)``)."""

    kind: str
    args: tuple[Any, ...]

    def points(self) -> tuple[Any, ...]:
        """Values that the distribution can draw and that bound what it draws (the ends, or every choice): a
        config built with each must be valid."""
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args


def parse_distribution(text: str, key: str = "") -> Distribution:
    """``"loguniform(0.01, 10)"`` -> ``Distribution("loguniform", (0.01, 10.0))``; a malformed string raises
    :class:`ConfigError` naming ``key`` and the forms allowed."""
    forms = "; ".join(DISTRIBUTIONS.values())
    m = _CALL.match(text)
    if m is None or m.group(1) not in DISTRIBUTIONS:
        raise ConfigError(key, f"{text!r} is not a distribution; write one of: {forms}")
    kind, raw = m.group(1), m.group(2)
    try:
        args = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise ConfigError(key, f"{text!r}: cannot read the arguments; {DISTRIBUTIONS[kind]}") from None
    args = [[_number(v) for v in a] if isinstance(a, list) else _number(a) for a in args]
    if kind == "choice":
        ok = len(args) == 1 and isinstance(args[0], list) and len(args[0]) > 0
        if not ok or not all(isinstance(v, (int, float, str, bool)) for v in args[0]):
            raise ConfigError(key, f"{text!r}: {DISTRIBUTIONS[kind]}")
        return Distribution(kind, tuple(args[0]))
    numbers = len(args) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args)
    if not numbers or not all(math.isfinite(v) for v in args) or not args[0] < args[1]:
        raise ConfigError(key, f"{text!r}: {DISTRIBUTIONS[kind]}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(key, f"{text!r}: {DISTRIBUTIONS[kind]}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in args):
            raise ConfigError(key, f"{text!r}: {DISTRIBUTIONS[kind]}")
        return Distribution(kind, (int(args[0]), int(args[1])))
    return Distribution(kind, (float(args[0]), float(args[1])))


@dataclass(frozen=True)
class TuneConfig:
    space: dict[str, dict[str, str] | str] = field(default_factory=dict)
    """What ``raydora tune`` searches: ``train.*`` key -> distribution, e.g. ``train.lam: loguniform(0.01, 10)``,
    ``train.beta: choice([0.05, 0.1, 0.3])``, ``train.lr: loguniform(1e-4, 1e-2)``, ``train.tau: uniform(0.1, 2)``,
    ``train.micro_batch_size: randint(2, 9)``. Written nested (``train: {lam: ...}``) or as dotted keys; on the
    command line ``tune.space.train.lam='loguniform(0.01, 10)'``. Only ``train.*`` keys: every trial reuses the
    base run's validate, classify, SFT and reference stages, which other sections would change."""
    num_samples: int = 8
    """Trials drawn from the space (Ray Tune's ``num_samples``); a space of choices only is drawn at random too."""
    metric: Literal["auto", "accuracy", "margin", "logp_accuracy", "reward_win_rate"] = "auto"
    """What selects the best trial (always maximised), on the validation pairs. auto: reward_win_rate when ``reward``
    resolves to a reward (the benchmark's gold reward, or the reward named), else logp_accuracy (docs/tune.md, "Which
    metric to select on": on biased labels the implicit reward's accuracy ranked trials against their win rate,
    the reward of the samples with them). accuracy, the share of pairs whose
    implicit reward beta * (log pi - log pi_ref) ranks the preferred response first; margin, that reward's mean
    chosen-minus-rejected gap (it scales with beta, so compare margins only at one beta); or logp_accuracy, the share
    whose preferred response the policy itself finds likelier (log pi(chosen) > log pi(rejected)): what it would
    sample, where the implicit reward measures only the change from the reference; or reward_win_rate, the win rate
    (win + tie/2) of the trial policy's samples against the reference policy's on the first ``sample_prompts``
    validation prompts, scored by ``reward`` (costs one generation pass per trial)."""
    reward: str = "auto"
    """What scores the validation samples for ``metric: reward_win_rate``: auto (evaluate.reward's rule: the
    benchmark's gold reward on benchmark prompts, else none), gold, biased, or a local reward-model or raydora
    classifier folder."""
    sample_prompts: int = 100
    """Validation prompts sampled per trial for ``metric: reward_win_rate`` (generate.n samples each)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """Ray Tune's trial scheduler: asha (AsyncHyperBandScheduler over ``training_iteration``) or fifo (every trial
    runs to the end). Each trial reports once, after training (docs/tune.md says why), so ASHA's only rung is the
    last one: it ranks finished trials and stops none early."""
    grace_period: int = 1
    """ASHA's grace period in reports (``training_iteration``)."""
    max_concurrent_trials: int = 0
    """Trials running at once (0: as many as the cluster's free resources allow; each trial needs its
    ``train.num_workers`` workers)."""
    validation: str | None = None
    """The selection set: preference rows (any layout ``data.input`` reads) labelled by the target preference,
    apart from the training rows and the evaluation prompts; validated and tokenised as the training data. null on
    the synthetic benchmark: ``validation_rows`` gold-labelled rows drawn apart from train, SFT and eval."""
    validation_rows: int = 256
    """Rows of the synthetic benchmark's validation set when ``validation`` is null."""
    seed: int | None = None
    """Seed of the search (Ray Tune's random search); null: the run's ``seed``."""

    def __post_init__(self) -> None:
        flat: dict[str, str] = {}
        for key, value in self.space.items():
            if isinstance(value, dict):
                flat.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                flat[key] = value
        for key, text in flat.items():
            if not key.startswith("train.") or key.count(".") != 1:
                raise ConfigError(
                    f"space.{key}",
                    "only train.<key> can be tuned: the trials reuse the base run's upstream stages (validate, "
                    "classify, sft, reference), which other sections change",
                )
            parse_distribution(text, f"space.{key}")
        object.__setattr__(self, "space", flat)  # one form: dotted keys
        for key in ("num_samples", "grace_period", "validation_rows", "sample_prompts"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be > 0")
        if self.max_concurrent_trials < 0:
            raise ConfigError("max_concurrent_trials", "must be >= 0 (0: as many as fit)")
        if self.validation is not None and not self.validation.strip():
            raise ConfigError("validation", "must be a path or null")
        if not self.reward.strip():
            raise ConfigError("reward", "must be auto, gold, biased or a reward-model folder")

    def distributions(self) -> dict[str, Distribution]:
        """``space`` parsed: dotted key -> :class:`Distribution`."""
        return {key: parse_distribution(str(text), f"tune.space.{key}") for key, text in self.space.items()}
