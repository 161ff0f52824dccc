"""The library API of docs/design.md: names, signatures and purity (torch + stdlib only, no Ray)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from raydora import logprobs, losses, robust

PAIR = ["policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps"]
API = {
    logprobs.sequence_logps: ["logits", "labels", "mask"],
    logprobs.token_counts: ["mask"],
    losses.dpo: [*PAIR, "beta"],
    losses.ipo: [*PAIR, "beta"],
    losses.cdpo: [*PAIR, "beta", "label_smoothing"],
    losses.rdpo: [*PAIR, "beta", "flip_rate"],
    losses.simpo: [
        "policy_chosen_logps",
        "policy_rejected_logps",
        "chosen_lengths",
        "rejected_lengths",
        "beta",
        "gamma",
    ],
    losses.dpo_pl: ["policy_logps", "reference_logps", "scores", "beta"],
    losses.rrhf: ["policy_logps", "lengths", "scores"],
    losses.lire: ["policy_logps", "scores", "temperature"],
    losses.reward_metrics: PAIR,
    robust.erm: ["losses"],
    robust.reweight: ["losses", "weights"],
    robust.kl_dro: ["losses", "lam"],
    robust.dora: ["losses", "weights", "lam"],
    robust.kldpo: ["losses", "tau", "normalize", "clip"],
    robust.dr_dpo: ["losses", "beta_prime"],
    robust.wdpo_penalty: ["losses", "embeddings"],
    robust.dora_weights: ["p_golden", "source_share", "alpha", "gamma", "eps"],
    robust.weight_stats: ["weights"],
}
DEFAULTS = {(losses.dpo, "beta"): 0.1, (robust.dora, "lam"): 1.0, (losses.lire, "temperature"): 2.0,
            (robust.kldpo, "normalize"): True, (robust.kldpo, "clip"): None, (robust.dora_weights, "gamma"): 1.0,
            (robust.dora_weights, "eps"): 1e-4}  # fmt: skip
OBJECTIVES = [robust.erm, robust.reweight, robust.kl_dro, robust.dora, robust.kldpo, robust.dr_dpo, robust.wdpo]


@pytest.mark.parametrize("fn", list(API), ids=lambda f: f.__name__)
def test_signature_matches_design(fn) -> None:
    params = list(inspect.signature(fn).parameters)
    assert params[: len(API[fn])] == API[fn]
    for (f, name), default in DEFAULTS.items():
        if f is fn:
            assert inspect.signature(fn).parameters[name].default == default


@pytest.mark.parametrize("fn", OBJECTIVES, ids=lambda f: f.__name__)
def test_every_objective_takes_a_group(fn) -> None:
    p = inspect.signature(fn).parameters["group"]
    assert p.default is None and p.kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("module", ["losses", "robust", "logprobs", "config", "typedconf", "tuneconf", "hardware"])
def test_pure_modules_import_no_ray(module: str) -> None:
    src = (Path(__file__).parents[1] / "raydora" / f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"ray", "transformers", "datasets", "pyarrow", "numpy"}, imported


def test_the_package_exports_its_api_without_importing_ray() -> None:
    import subprocess
    import sys

    code = (
        "import sys, raydora\n"
        "cfg = raydora.load_config(None, ['train.objective=dora'])\n"
        "assert isinstance(cfg, raydora.RunConfig) and cfg.train.objective == 'dora'\n"
        "assert raydora.robust.dora and raydora.losses.dpo and raydora.logprobs.sequence_logps\n"
        "assert raydora.calibration and raydora.StageResult and issubclass(raydora.ConfigError, ValueError)\n"
        "assert all(getattr(raydora, name) is not None for name in raydora.__all__)\n"
        "print(sorted(m for m in ('ray', 'pyarrow', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    import raydora

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        raydora.nope  # noqa: B018


def test_run_stage_runs_one_stage_with_force(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import raydora
    from raydora import cluster, pipeline
    from raydora.rundir import StageResult

    assert raydora.STAGE_NAMES == tuple(pipeline.STAGES)
    calls: list[tuple[Path, bool]] = []

    def fake(cfg, run_dir, force=False):
        calls.append((run_dir, force))
        return StageResult("train", {}, {"rows": 1})

    monkeypatch.setitem(pipeline.STAGES, "train", fake)
    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: None)
    cfg = raydora.load_config(None, [f"root={tmp_path}", "name=run"])
    assert raydora.run_stage(cfg, "train", force=True).counts == {"rows": 1}
    assert calls == [(cfg.run_dir, True)] and (cfg.run_dir / "config.yaml").is_file()
    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        raydora.run_stage(cfg, "nope")


def test_every_stage_meets_the_stage_protocol() -> None:
    """``run(cfg, run_dir, *, force=False) -> StageResult``: what ``pipeline.Stage`` declares (mypy checks the
    types statically; this checks the call shape the pipeline and ``run_stage`` rely on)."""
    from raydora import pipeline

    for name, fn in pipeline.STAGES.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["cfg", "run_dir"], name
        force = inspect.signature(fn).parameters["force"]
        assert force.kind is inspect.Parameter.KEYWORD_ONLY and force.default is False, name
        assert fn.__module__ == f"raydora.{name}", f"stage {name} lives in {fn.__module__}"
