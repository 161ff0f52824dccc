"""raydora tune: the ``tune`` section's parsing and errors (no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raydora.config import ConfigError, load_config
from raydora.tuneconf import Distribution, parse_distribution


# ---- the config section (no Ray) ---------------------------------------------------------------------------------
def test_distribution_strings_parse_into_tunes_samplers_arguments() -> None:
    assert parse_distribution("loguniform(0.01, 10)") == Distribution("loguniform", (0.01, 10.0))
    assert parse_distribution(" uniform( -1 , 2.5 ) ") == Distribution("uniform", (-1.0, 2.5))
    assert parse_distribution("randint(2, 9)") == Distribution("randint", (2, 9))
    assert parse_distribution("randint(2, 9)").points() == (2, 8)  # Tune's randint excludes the upper end
    assert parse_distribution("choice([0.05, 0.1, dora])") == Distribution("choice", (0.05, 0.1, "dora"))
    for bad, says in [
        ("normal(0, 1)", "is not a distribution"),
        ("loguniform(0, 10)", "0 < low < high"),
        ("uniform(2, 1)", "low < high"),
        ("uniform(1)", "low < high"),
        ("randint(1.5, 4)", "an integer"),
        ("choice([])", "one of the listed values"),
        ("choice(0.1, 0.2)", "one of the listed values"),
        ("loguniform(1e-3, inf)", "0 < low < high"),
    ]:
        with pytest.raises(ConfigError, match=says) as e:
            parse_distribution(bad, "space.train.lam")
        assert e.value.key == "space.train.lam"


def test_the_tune_section_reads_nested_or_dotted_and_names_the_key_at_fault(tmp_path: Path) -> None:
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(
        "tune:\n  space:\n    train:\n      lam: loguniform(0.01, 10)\n    train.beta: choice([0.05, 0.1])\n"
    )
    nested = load_config(yaml_file).tune
    dotted = load_config(
        None, ["tune.space.train.lam=loguniform(0.01, 10)", "tune.space.train.beta=choice([0.05, 0.1])"]
    )
    assert (
        nested.space == dotted.tune.space == {"train.lam": "loguniform(0.01, 10)", "train.beta": "choice([0.05, 0.1])"}
    )
    assert nested.distributions()["train.lam"] == Distribution("loguniform", (0.01, 10.0))
    assert load_config(None, []).tune.space == {} and load_config(None, []).tune.metric == "accuracy"
    errors = {
        "tune.space.sft.lr=uniform(1e-4, 1e-3)": "tune.space.sft.lr: only train.<key> can be tuned",
        "tune.space.seed=choice([0, 1])": "tune.space.seed: only train.<key>",
        "tune.space.train.lam=loguniform(-1, 10)": "tune.space.train.lam: 'loguniform(-1, 10)'",
        "tune.num_samples=0": "tune.num_samples: must be > 0",
        "tune.metric=loss": "tune.metric: must be one of 'accuracy', 'margin'",
        "tune.max_concurrent_trials=-1": "tune.max_concurrent_trials: must be >= 0",
        "tune.scheduler=pbt": "tune.scheduler: must be one of 'asha', 'fifo'",
    }
    for override, says in errors.items():
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [override])
