"""Evaluation: win rates by hand, bootstrap interval coverage, the report on the benchmark, plots, the comparison
of runs, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from raydora import evaluate as ev
from raydora import reporting, rewards, synth

PNG = b"\x89PNG\r\n\x1a\n"


def test_outcomes_over_all_pairs_by_hand() -> None:
    # policy {1, 3} vs reference {2, 3}: pairs (1,2) lose, (1,3) lose, (3,2) win, (3,3) tie.
    assert ev.outcomes([1.0, 3.0], [2.0, 3.0]) == (0.25, 0.25, 0.5)
    assert ev.outcomes([1.0], [1.0 + 1e-9]) == (0.0, 1.0, 0.0)  # within the tie tolerance
    assert ev.outcomes([1.0], [1.1], tol=0.2) == (0.0, 1.0, 0.0)


def test_win_rate_by_hand() -> None:
    policy = [[1.0, 3.0], [5.0], [0.0]]
    reference = [[2.0, 3.0], [4.0], []]  # the third prompt has no reference: skipped
    w = ev.win_rate(policy, reference, tol=1e-6, resamples=200, seed=0)
    # prompt scores: 0.25 + 0.25/2 = 0.375, and 1.0
    assert w["prompts"] == 2
    assert w["win_rate"] == pytest.approx((0.375 + 1.0) / 2)
    assert (w["win"], w["tie"], w["lose"]) == pytest.approx(((0.25 + 1) / 2, 0.25 / 2, 0.5 / 2))
    lo, hi = w["ci95"]
    assert 0.375 <= lo <= w["win_rate"] <= hi <= 1.0


def test_bootstrap_interval_covers_the_known_rate() -> None:
    """In 300 simulated evaluations of 80 prompts with a true win rate of 0.65, the 95% interval holds the truth
    about 95% of the time (a binomial 99.9% band around 0.95 for 300 trials is roughly [0.90, 0.99])."""
    rng = np.random.default_rng(0)
    truth, covered = 0.65, 0
    for trial in range(300):
        wins = rng.random((80, 2)) < truth  # 2 samples per prompt, each against one reference
        policy = [[float(x) for x in row] for row in wins]
        w = ev.win_rate(policy, [[0.5]] * 80, tol=1e-6, resamples=400, seed=trial)
        covered += w["ci95"][0] <= truth <= w["ci95"][1]
    assert 0.90 <= covered / 300 <= 0.99, covered / 300


def benchmark_prompts(n: int = 12) -> pa.Table:
    import random

    rng = random.Random(1)
    prompts = [synth.make_prompt(rng) for _ in range(n)]
    return pa.table({"id": [f"e{i}" for i in range(n)], "prompt": prompts,
                     "reference": [synth.answer(p) for p in prompts],
                     "task": [synth.parse_prompt(p)[0] for p in prompts]})  # fmt: skip


def generations(prompts: pa.Table, responses: list[list[str]]) -> pa.Table:
    return pa.table({"id": prompts.column("id"), "prompt": prompts.column("prompt"), "generations": responses})


def test_report_on_the_benchmark_by_hand() -> None:
    prompts = benchmark_prompts()
    texts = prompts.column("prompt").to_pylist()
    golden = [[synth.answer(p), synth.answer(p)] for p in texts]  # a perfect policy, 2 samples per prompt
    sloppy_sft = [["definitely : " + synth.answer(p), "oak"] for p in texts]
    report = ev.build_report(prompts, {"policy": generations(prompts, golden), "sft": generations(prompts, sloppy_sft)},
                             "gold", alphas=(0.0, 1.0), bootstrap=200)  # fmt: skip
    assert report["policy"] == "policy" and report["prompts"] == 12 and report["samples_per_prompt"] == 2
    # The exact answer has the maximal gold reward 1: it ties golden answers of the same length and beats the rest.
    assert report["mean_reward"]["policy"] == pytest.approx(1.0)
    expected_sft = np.mean([synth.gold_reward(p, r) for p, rs in zip(texts, sloppy_sft, strict=True) for r in rs])
    assert report["mean_reward"]["sft"] == pytest.approx(expected_sft)
    vs_sft = report["win_rates"]["sft"]
    assert vs_sft["win"] == pytest.approx(1.0) and vs_sft["win_rate"] == pytest.approx(1.0)
    assert set(report["win_rates"]) == {"sft", "golden", "verbose", "sloppy"}
    assert report["win_rates"]["golden"]["lose"] == 0.0  # nothing beats the exact answer
    assert report["artefacts"]["sft"]["confident"] == pytest.approx(0.5)
    assert report["artefacts"]["policy"] == {"filler": 0.0, "confident": 0.0, "empty": 0.0}
    assert sum(w["prompts"] for w in report["by_task"].values()) == 12
    sweep = {row["alpha"]: row for row in report["sweep"]}
    # alpha = 1: pure correctness; "definitely : <answer>" is as correct as the answer (filler words don't count).
    assert sweep[1.0]["mean_reward"]["policy"] == pytest.approx(1.0)
    assert sweep[0.0]["mean_reward"]["policy"] == pytest.approx(1.0)  # and the most concise
    # By hand, per prompt, against the SFT samples ("definitely : <answer>", "oak"):
    # alpha = 1: tie with the first (equally correct), beat "oak"  -> (0.5 + 1) / 2;
    # alpha = 0: beat the first (2 extra tokens), tie "oak" (no extra tokens either) -> (1 + 0.5) / 2.
    assert sweep[1.0]["vs_sft"]["win_rate"] == pytest.approx(0.75)
    assert sweep[1.0]["vs_sft"]["tie"] == pytest.approx(0.5) and sweep[0.0]["vs_sft"]["win"] == pytest.approx(0.5)
    assert sweep[0.0]["vs_sft"]["win_rate"] == pytest.approx(0.75)
    # The headline's last line says what the interval says against parity.
    assert reporting.win_table(report).splitlines()[-1] == "policy beats (95% CI above 0.5) its SFT start"
    assert reporting.verdict({"ci95": (0.4, 0.49)}) == "loses to (95% CI below 0.5)"
    assert reporting.verdict({"ci95": (0.45, 0.5)}) == "is not distinguishable from (95% CI holds 0.5)"


def test_reports_need_every_prompt_and_a_matching_reward() -> None:
    prompts = benchmark_prompts(3)
    partial = generations(prompts.slice(0, 2), [["a"], ["b"]])
    with pytest.raises(ValueError, match="lack 1 prompts"):
        ev.build_report(prompts, {"policy": partial}, "gold")
    real = pa.table({"id": ["x"], "prompt": ["what is the capital of France?"]})
    with pytest.raises(ValueError, match="gold needs the benchmark"):
        ev.build_report(real, {"policy": generations(real, [["Paris"]])}, "gold")


def test_real_data_references_come_from_the_prompt_file_by_source() -> None:
    prompts = pa.table({"id": ["a", "b"], "prompt": ["p1", "p2"], "responses": [["good", "bad"], ["ok", "meh"]],
                        "sources": [["human", "model"], ["human", "model"]]})  # fmt: skip
    lengths = lambda ps, rs: np.array([float(len(r)) for r in rs])  # a toy reward: longer is better
    report = ev.build_report(prompts, {"policy": generations(prompts, [["goodish"], ["o"]])}, lengths,
                             references=("sources",), bootstrap=100)  # fmt: skip
    # vs human: "goodish" (7) > "good" (4) wins, "o" (1) < "ok" (2) loses; vs model: 7 > 3 wins, 1 < 3 loses.
    assert report["win_rates"]["human"]["win_rate"] == pytest.approx(0.5)
    assert report["win_rates"]["model"]["win"] == pytest.approx(0.5)
    assert report["reward"] == "model" and "sweep" not in report


def test_report_files_plots_and_the_comparison(tmp_path: Path) -> None:
    prompts = benchmark_prompts(6)
    texts = prompts.column("prompt").to_pylist()
    for i, (name, objective) in enumerate((("erm", "erm"), ("dora", "dora"))):
        policy = [[synth.answer(p) if i else "oak"] for p in texts]
        report = ev.build_report(prompts, {"policy": generations(prompts, policy),
                                           "sft": generations(prompts, [["definitely : oak"]] * 6)}, "gold",
                                 alphas=(0.0, 0.5, 1.0), bootstrap=100)  # fmt: skip
        report["run"] = {"name": name, "loss": "dpo", "objective": objective}
        reporting.write_report(report, tmp_path / name / "eval")
        for f in ("winrate.png", "reward_vs_alpha.png"):
            assert (tmp_path / name / "eval" / f).read_bytes()[:8] == PNG
        md = (tmp_path / name / "eval" / "report.md").read_text()
        assert "| sft |" in md and "Shift sweep" in md and "| 1.00 |" in md
        assert json.loads((tmp_path / name / "eval" / "report.json").read_text())["prompts"] == 6
    text, summary = ev.compare([tmp_path / "erm", tmp_path / "dora"], tmp_path / "cmp")
    assert "| erm | erm / dpo |" in text and "| dora | dora / dpo | 1.000 | 1.000" in text
    assert [r["name"] for r in summary["runs"]] == ["erm", "dora"]
    assert (tmp_path / "cmp" / "winrate.png").read_bytes()[:8] == PNG
    assert (tmp_path / "cmp" / "reward_vs_alpha.png").read_bytes()[:8] == PNG
    with pytest.raises(FileNotFoundError, match="raydora evaluate"):
        ev.compare([tmp_path / "missing"])


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from raydora.cli import main

    prompts = benchmark_prompts(4)
    report = ev.build_report(prompts, {"policy": generations(prompts, [["x"]] * 4),
                                       "sft": generations(prompts, [["y"]] * 4)}, "gold", bootstrap=100)  # fmt: skip
    reporting.write_report(report, tmp_path / "run1" / "eval")
    assert main(["report", str(tmp_path / "run1"), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| run1 |" in out and (tmp_path / "out" / "report.md").is_file()


def test_classifier_reward_is_its_calibrated_p_golden(tmp_path: Path) -> None:
    import torch

    from raydora.calibration import sigmoid
    from raydora.classifier import margins
    from raydora.models import build_model, save_pretrained, train_tokenizer

    tok = train_tokenizer(["sort: a b", "a b", "b a"] * 10, tmp_path / "tok", vocab_size=280, kind="encoder")
    model = build_model("tiny-bert", tok, seed=0)
    save_pretrained(model, tok, tmp_path / "clf")
    (tmp_path / "clf" / "calibration.json").write_text(json.dumps({"temperature": 2.0, "gamma": 1.0}))
    rm = rewards.RewardModel(str(tmp_path / "clf"), max_length=32)
    got = rm.rewards(["sort: a b", "sort: a b"], ["a b", "b a"])
    expected = sigmoid(margins(rm.model, rm.tokenizer, ["sort: a b"] * 2, ["a b", "b a"], 32) / 2.0)
    assert np.allclose(got, expected) and ((got > 0) & (got < 1)).all()
    # A Platt-calibrated classifier: its bias shifts the margins before the sigmoid.
    (tmp_path / "clf" / "calibration.json").write_text(json.dumps({"temperature": 2.0, "bias": -0.7, "gamma": 1}))
    shifted = rewards.RewardModel(str(tmp_path / "clf"), max_length=32).rewards(["sort: a b"] * 2, ["a b", "b a"])
    z = margins(rm.model, rm.tokenizer, ["sort: a b"] * 2, ["a b", "b a"], 32)
    assert np.allclose(shifted, sigmoid(z / 2.0 - 0.7)) and (shifted < got).all()
    with torch.no_grad():
        table = rm(pa.table({"prompt": ["sort: a b"], "response": ["a b"]}))
    assert table.column("reward").to_pylist() == pytest.approx([got[0]])


def test_heldout_log_probs_of_two_models_share_one_pass_and_cache_each_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The held-out pairs of the trained and the initial policy go through one reference pass (one actor pool on
    Ray; here the pass runs in-process), split into each model's own cache: the same tables and log-probs, bit for
    bit, as a pass per model; a rerun skips, and a changed model redoes only its own cache."""
    import pyarrow.parquet as pq

    from raydora import reference
    from raydora.config import load_config
    from raydora.models import build_model, save_pretrained, train_tokenizer
    from raydora.rundir import promote, staging, write_success

    texts = ["sort : b a c", "a b c", "reverse : x y z", "z y x", "count : a a b", "3", "well , the answer is"]
    tok = train_tokenizer(texts * 5, tmp_path / "tok", vocab_size=300)
    policy, sft = (save_pretrained(build_model("tiny-gpt2", tok, seed=s), tok, tmp_path / n)
                   for s, n in ((1, "policy"), (2, "sft")))  # fmt: skip
    rows = pa.table({"id": [f"h{i}" for i in range(5)], "prompt": [texts[i % 5] for i in range(5)],
                     "responses": [["a b c", "z y x", "3"], ["3", "x"], ["well , 3", "a"], ["b", "c"], ["z", "y"]],
                     "scores": [[0.2, 0.9, 0.1], [1.0, 0.0], [0.3, 0.7], [0.5, 0.5], [0.0, 1.0]]})  # fmt: skip
    passes: list[list[str]] = []

    def in_process(input_dir: Path, out_dir: Path, *, model_dir: Path, tokenizer: Path, fp: str, stage: str,
                   cfg: Any, more_models: tuple[Path, ...] = (), **kw: Any) -> int:  # fmt: skip
        passes.append([Path(model_dir).name, *(Path(m).name for m in more_models)])
        actor = reference.ReferenceModel(str(model_dir), str(tokenizer), batch_size=2,
                                         more_models=tuple(map(str, more_models)), **kw)  # fmt: skip
        out = Path(out_dir)
        with staging(out.parent, out.name) as tmp:
            (tmp / "out").mkdir()
            for i, f in enumerate(sorted(Path(input_dir).glob("*.parquet"))):
                pq.write_table(actor(pq.read_table(f)), tmp / "out" / f"part-{i:06d}.parquet")
            write_success(tmp / "out", {"stage": stage, "fingerprint": fp, "rows": {stage: 5}, "truncated": 0})
            promote(tmp / "out", out)
        return 5

    monkeypatch.setattr(reference, "encode_rows", in_process)
    runs = []
    for name in ("together", "apart"):
        run = tmp_path / name
        (run / "heldout").mkdir(parents=True)
        pq.write_table(rows.slice(0, 3), run / "heldout" / "part-000000.parquet")
        pq.write_table(rows.slice(3), run / "heldout" / "part-000001.parquet")
        write_success(run / "heldout", {"stage": "validate", "fingerprint": "held", "rows": {"heldout": 5}})
        runs.append(run)
    cfg = load_config(None, [f"model.tokenizer={tmp_path / 'tok'}", "model.max_length=32", "model.precision=fp32",
                             "reference.device=cpu", "model.pad_to_multiple_of=8"])  # fmt: skip
    models = {"policy": policy, "sft": sft}
    together = ev.heldout_logps_of(cfg, runs[0], models)
    assert passes == [["policy", "sft"]]
    apart = {k: ev.heldout_logps(cfg, runs[1], k, m) for k, m in models.items()}
    assert passes[1:] == [["policy"], ["sft"]]
    for k in models:
        assert together[k].shape == (5, 2) and np.array_equal(together[k], apart[k])
        a, b = (pa.concat_tables([pq.read_table(f) for f in sorted((r / "eval_logps" / k).glob("*.parquet"))])
                for r in runs)  # fmt: skip
        assert a.equals(b) and a.column_names[-1] == "reference_logps"
        marker = json.loads((runs[0] / "eval_logps" / k / "_SUCCESS").read_text())
        assert marker["stage"] == f"heldout_{k}" and marker["rows"] == {f"heldout_{k}": 5}
    assert not np.array_equal(together["policy"], together["sft"])
    passes.clear()
    assert all(np.array_equal(v, together[k]) for k, v in ev.heldout_logps_of(cfg, runs[0], models).items())
    assert passes == []  # both caches are valid: no pass
    save_pretrained(build_model("tiny-gpt2", tok, seed=3), tok, policy)  # a new trained policy
    again = ev.heldout_logps_of(cfg, runs[0], models)
    assert passes == [["policy"]] and np.array_equal(again["sft"], together["sft"])
    assert not np.array_equal(again["policy"], together["policy"])
