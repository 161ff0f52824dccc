"""raydora.experiment: its method table builds valid configs and its interval covers the truth; bench/experiments.py:
its findings report what the numbers say (including when a paper's claim fails)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bench import experiments as exp
from raydora import experiment
from raydora.config import load_config
from raydora.rundir import file_fingerprints

ROOT = Path(__file__).resolve().parents[1]


def test_every_method_is_a_valid_config() -> None:
    """Each method's overrides load against the experiments config and set the loss and objective it names."""
    config = ROOT / "jobs" / "configs" / "experiments_cpu.yaml"
    seen = set()
    for method in experiment.METHODS:
        cfg = load_config(config, [f"name={method.replace('+', '_')}", *experiment.method_overrides(method, 0.4)])
        t = cfg.train
        seen.add((t.loss, t.objective, t.kldpo_normalize, t.lam, t.tau, t.rho, cfg.classifier.calibration))
        if method == "rdpo":
            assert cfg.train.loss == "rdpo" and cfg.train.flip_rate == pytest.approx(0.2)
        if method.endswith("+dora"):
            assert cfg.train.objective == "dora" and cfg.train.loss == method.split("+")[0]
    tp = "temperature"
    assert ("dpo", "kldpo", True, 1.0, 1.0, 0.01, tp) in seen and ("dpo", "kldpo", False, 1.0, 1.0, 0.01, tp) in seen
    assert ("dpo", "kldpo", True, 1.0, 0.1, 0.01, tp) in seen and ("dpo", "wdpo", True, 1.0, 1.0, 0.1, tp) in seen
    assert ("dpo", "dora", True, 1.0, 1.0, 0.01, "platt") in seen  # dora_platt: DoRA on Platt-calibrated weights
    assert len(seen) == len(experiment.METHODS) - 1  # only the oracle repeats ERM's settings (on other labels)
    assert load_config(config, experiment.method_overrides("rdpo", 0.0)).train.flip_rate == pytest.approx(0.1)


def test_two_level_ci() -> None:
    """Constant groups give a point interval; in a simulation with a seed effect, the interval covers the true
    mean at close to its 95% level, where a one-level bootstrap over the pooled prompts would not."""
    assert experiment.two_level_ci([[0.25] * 10, [0.25] * 7]) == pytest.approx([0.25, 0.25])
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(60):
        groups = [list(rng.normal(0.5 + rng.normal(0, 0.05), 0.2, size=40)) for _ in range(5)]
        lo, hi = experiment.two_level_ci(groups, resamples=400, seed=1)
        covered += lo <= 0.5 <= hi
    assert covered >= 45  # 75%: five seeds make the seed-level resampling coarse, but it must mostly cover


def _row(rate: float, half: float = 0.02) -> dict:
    return {"win_rate": rate, "ci95": [rate - half, rate + half],
            "sweep": [{"alpha": a, "win_rate": rate + a / 10} for a in (0.0, 1.0)]}  # fmt: skip


def test_findings_say_when_a_claim_fails() -> None:
    ok = {"erm": _row(0.2), "oracle": _row(0.6), "dora": _row(0.4), "reweight": _row(0.3), "kl_dro": _row(0.1)}
    lines = exp.findings({"noise": {"n00": ok, "n20": {"erm": _row(0.2), "dora": _row(0.25)}}})
    text = "\n".join(lines)
    assert "holds in the means; measured dora > reweight > kl_dro" in text
    assert "0.400 in win rate" in text  # the oracle-ERM gap
    assert "20%: +0.050" in text and "0%: +0.200" in text
    bad = dict(ok, reweight=_row(0.41))
    text = "\n".join(exp.findings({"noise": {"n00": bad}}))
    assert "does not hold" in text and "reweight ≳ dora" in text  # overlapping intervals: ordered, not apart


def test_a_child_links_what_its_plan_does_not_own(tmp_path: Path) -> None:
    """Each plan links every shared folder of the base but its own, as relative links (the experiment folder can
    move), keeps what the child already has, and a finished child runs nothing (no Ray is started here)."""
    assert experiment.child_plan("oracle") is experiment.OWN_DATA
    assert experiment.child_plan("dora_platt") is experiment.OWN_CLASSIFIERS
    assert experiment.child_plan("dora") is experiment.REUSE_UPSTREAM
    assert experiment.REUSE_UPSTREAM.linked == experiment.SHARED
    base = tmp_path / "s0" / "base"
    for name in experiment.SHARED:
        (base / name).mkdir(parents=True)
        (base / name / "_SUCCESS").write_text("{}")
    child = tmp_path / "s0" / "oracle"
    (child / "reference").mkdir(parents=True)  # its own, already there: kept
    (child / "synth").mkdir()  # an upstream folder the child already has: kept, not replaced
    made = experiment.link_shared(base, child, experiment.OWN_DATA.linked)
    assert {p.relative_to(child).as_posix() for p in made} == set(experiment.OWN_DATA.linked) - {"synth"}
    for p in made:
        assert p.is_symlink() and not os.path.isabs(os.readlink(p)) and (p / "_SUCCESS").is_file()
    for name in (*experiment.OWN_DATA.own, "synth"):
        assert not (child / name).is_symlink()
    assert os.readlink(child / "generations" / "sft") == os.path.join("..", "..", "base", "generations", "sft")
    moved = tmp_path / "moved"
    os.rename(tmp_path / "s0", moved)
    assert (moved / "oracle" / "sft" / "_SUCCESS").is_file()
    cfg = load_config(None, [f"root={moved}", "name=oracle"])
    (moved / "oracle" / "eval").mkdir()
    (moved / "oracle" / "eval" / "_SUCCESS").write_text("{}")
    assert experiment.run_child(cfg, moved / "base", experiment.OWN_DATA) == moved / "oracle"


def test_fingerprints_survive_a_move_but_not_an_edit(tmp_path: Path) -> None:
    """Fingerprints name files relative to the folder, so a moved or symlinked run still matches its markers."""
    a = tmp_path / "a" / "stage"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.bin").write_bytes(b"123")
    (a / "y.txt").write_text("hello")
    before = file_fingerprints(a)
    (tmp_path / "b").mkdir()
    moved = tmp_path / "b" / "stage"
    os.rename(a, moved)
    assert file_fingerprints(moved) == before
    link = tmp_path / "link"
    link.symlink_to(moved)
    assert file_fingerprints(link) == before
    (moved / "y.txt").write_text("hello!")
    assert file_fingerprints(moved) != before
