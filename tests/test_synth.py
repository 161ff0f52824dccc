"""The synthetic shift benchmark: gold reward by hand, determinism, declared shares, biased labels that really
disagree with gold, and the Ray Data writer."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from raydora import synth, validate

SHARES = {"golden": 0.25, "verbose": 0.375, "sloppy": 0.375}
P = "sort: pear apple fig"


def test_gold_reward_by_hand() -> None:
    """alpha0 = 0.8. Golden 'apple fig pear': correct, no extra tokens -> 0.8 + 0.2 = 1.
    Verbose (15 tokens, 12 extra): correctness 1, conciseness e^(-12/4) = 0.04979 -> 0.8 + 0.2 * 0.04979 = 0.80996.
    Sloppy 'definitely : apple pear fig': 1 of 3 positions right, 2 extra tokens -> 0.8/3 + 0.2 e^(-1/2) = 0.38797."""
    assert synth.answer(P) == "apple fig pear"
    assert synth.gold_reward(P, "apple fig pear") == pytest.approx(1.0)
    verbose = "well , the answer is : apple fig pear . i hope this helps !"
    assert synth.gold_reward(P, verbose) == pytest.approx(0.8 + 0.2 * math.exp(-12 / 4))
    assert synth.gold_reward(P, "definitely : apple pear fig") == pytest.approx(0.8 / 3 + 0.2 * math.exp(-0.5))
    assert synth.correctness("count: a b c", "4") == 0.5 and synth.correctness("count: a b c", "3 words") == 1.0
    assert synth.correctness("reverse: oak elm", "elm oak") == 1.0


def test_biased_labeller_prefers_the_artefacts() -> None:
    """Verbose gets +0.04 per token (15 tokens: +0.6): 1.40996 > 1.0 for the golden answer under gold."""
    verbose = "well , the answer is : apple fig pear . i hope this helps !"
    assert synth.biased_score(P, verbose) == pytest.approx(synth.gold_reward(P, verbose) + 0.6)
    assert synth.biased_score(P, verbose) > synth.gold_reward(P, "apple fig pear")
    assert synth.biased_score(P, "definitely : apple fig pear") > synth.biased_score(P, "apple fig pear")


def test_second_shift_moves_the_preference() -> None:
    """alpha = 1 scores correctness only: verbose ties golden; alpha = 0 scores conciseness only: a short wrong
    answer beats the long right one."""
    verbose = "sure , let me help : apple fig pear . that is all ."
    assert synth.gold_reward(P, verbose, alpha=1.0) == synth.gold_reward(P, "apple fig pear", alpha=1.0)
    assert synth.gold_reward(P, "fig", alpha=0.0) > synth.gold_reward(P, verbose, alpha=0.0)


def test_rows_are_deterministic_per_seed() -> None:
    kw = {"k": 4, "shares": SHARES, "label_noise": 0.2}
    a = list(synth.generate_rows(0, 50, seed=3, **kw))
    assert a == list(synth.generate_rows(0, 50, seed=3, **kw))
    assert a != list(synth.generate_rows(0, 50, seed=4, **kw))
    assert all(len(set(r["responses"])) == 4 and len(set(r["scores"])) > 1 for r in a)


def test_label_noise_changes_labels_only() -> None:
    """The noise sweep is a controlled experiment: at every noise level the rows hold the same prompts,
    responses and sources; only the scores of the shuffled rows (about the noise share) differ."""
    kw = {"k": 4, "shares": SHARES, "seed": 1}
    clean = list(synth.generate_rows(0, 400, label_noise=0.0, **kw))
    noisy = list(synth.generate_rows(0, 400, label_noise=0.4, **kw))
    for a, b in zip(clean, noisy, strict=True):
        assert {k: v for k, v in a.items() if k != "scores"} == {k: v for k, v in b.items() if k != "scores"}
        assert sorted(a["scores"]) == sorted(b["scores"])  # a shuffle: the same scores, reordered
    changed = sum(a["scores"] != b["scores"] for a, b in zip(clean, noisy, strict=True)) / len(clean)
    assert 0.2 < changed < 0.4  # 40% shuffled, minus the shuffles that leave the order as it was


def test_allocation_meets_declared_shares_exactly() -> None:
    labels = synth.allocate(SHARES, 4000, random.Random(0))
    assert {s: labels.count(s) for s in SHARES} == {"golden": 1000, "verbose": 1500, "sloppy": 1500}


def test_labels_disagree_with_gold_on_synthetic_pairs_only() -> None:
    """Without noise, golden pairs are ordered by gold (0% disagreement); pairs with a synthetic response
    disagree often (measured ~63%). Noise then also flips golden pairs."""
    clean = synth.disagreement(list(synth.generate_rows(0, 2000, k=4, shares=SHARES, label_noise=0.0, seed=0)))
    assert clean["golden_pairs"] == 0.0
    assert clean["synthetic_pairs"] > 0.4
    noisy = synth.disagreement(list(synth.generate_rows(0, 2000, k=4, shares=SHARES, label_noise=0.5, seed=0)))
    assert noisy["golden_pairs"] > 0.1


def _jsonl(folder: Path) -> list[dict]:
    rows = [json.loads(line) for f in sorted(folder.glob("*.json")) for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: r.get("id", r["prompt"]))


@pytest.mark.usefixtures("ray_session")
def test_write_benchmark_streams_every_split(tmp_path: Path) -> None:
    kw = {"rows": 600, "k": 4, "label_noise": 0.1, "seed": 5, "eval_rows": 40, "block_rows": 200}
    result = synth.write_benchmark(tmp_path / "a", **kw)
    train, oracle = _jsonl(tmp_path / "a" / "train"), _jsonl(tmp_path / "a" / "oracle")
    assert len(train) == len(oracle) == 600 and len(_jsonl(tmp_path / "a" / "eval")) == 40
    assert len(_jsonl(tmp_path / "a" / "sft")) == 600
    # declared shares met exactly (200-row blocks of 800 responses: 200 / 300 / 300 each)
    sources = [s for r in train for s in r["sources"]]
    assert {s: sources.count(s) for s in SHARES} == {"golden": 600, "verbose": 900, "sloppy": 900}
    # oracle = the same rows labelled by gold
    for t, o in zip(train[:50], oracle[:50], strict=True):
        assert t["responses"] == o["responses"]
        assert o["scores"] == pytest.approx([synth.gold_reward(o["prompt"], r) for r in o["responses"]], abs=1e-6)
    assert result.info["label_disagreement"]["synthetic_pairs"] > 0.4
    # deterministic per seed, and a rerun skips
    synth.write_benchmark(tmp_path / "b", **kw)
    assert _jsonl(tmp_path / "b" / "train") == train
    assert synth.write_benchmark(tmp_path / "a", **kw).skipped
    # and the output is valid canonical data
    checked = validate.validate(tmp_path / "a" / "train", tmp_path / "run")
    assert checked.counts == {"input": 600, "valid": 600, "quarantined": 0}
