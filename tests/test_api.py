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


@pytest.mark.parametrize("module", ["losses", "robust", "logprobs", "config", "hardware"])
def test_pure_modules_import_no_ray(module: str) -> None:
    src = (Path(__file__).parents[1] / "raydora" / f"{module}.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"ray", "transformers", "datasets", "pyarrow", "numpy"}, imported
