"""The online loop: labelling a round's samples (by hand), and two real rounds on Ray from a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raydora import loop, synth, validate
from raydora.config import ConfigError, load_config
from raydora.rundir import read_success


def test_label_builds_rows_from_distinct_samples_and_the_prompts_golden_responses() -> None:
    samples = pa.table({
        "id": ["a", "b", "c", "d", "e"],
        "prompt": ["pa", "pb", "pc", "pd", "pe"],
        "generations": [["x", "yy", "x"], ["same", "same", " "], ["u", "vvv", ""], ["z", "z"], ["g5", "w"]],
    })  # fmt: skip
    prompts = pa.table({
        "id": ["a", "b", "c", "d", "e"], "prompt": ["pa", "pb", "pc", "pd", "pe"],
        "responses": [["g1", "s1"], ["s2", "g2"], ["s3", "t3"], ["s4", "t4"], ["g5", "s5"]],
        "sources": [["golden", "verbose"], ["sloppy", "golden"], ["verbose", "sloppy"], ["verbose", "sloppy"],
                    ["golden", "sloppy"]],
    })  # fmt: skip
    calls = []

    def reward(ps: list[str], rs: list[str]) -> list[float]:
        calls.append(list(rs))
        return [float(len(r)) for r in rs]

    rows, counts = loop.label(samples, prompts, reward, "policy-r1", with_golden=True)
    by_id = {r["id"]: r for r in rows}
    # a: two distinct samples and its golden response. b: one distinct non-blank sample, kept by its golden one.
    # c: no golden response. d: one distinct sample and nothing else: dropped. e: the golden response is a sample.
    assert sorted(by_id) == ["policy-r1-a", "policy-r1-b", "policy-r1-c", "policy-r1-e"]
    a, b = by_id["policy-r1-a"], by_id["policy-r1-b"]
    assert a["responses"] == ["x", "yy", "g1"] and a["scores"] == [1.0, 2.0, 2.0]
    assert a["sources"] == ["policy-r1", "policy-r1", "golden"]
    assert b["responses"] == ["same", "g2"] and b["sources"] == ["policy-r1", "golden"] and b["scores"] == [4.0, 2.0]
    assert by_id["policy-r1-c"]["sources"] == ["policy-r1"] * 2
    assert by_id["policy-r1-e"]["responses"] == ["g5", "w"] and by_id["policy-r1-e"]["sources"] == ["policy-r1"] * 2
    # The samples' mean reward counts every distinct sample, the dropped prompt's too: (1+2+4+1+3+1+2+1) / 8.
    assert counts == {"prompts": 5, "rows": 4, "dropped": 1, "golden_responses": 2, "sample_reward_mean": 15 / 8}
    assert calls == [["x", "yy", "g1", "same", "g2", "u", "vvv", "z", "g5", "w"]]  # one batched call
    rows, counts = loop.label(samples, prompts, reward, "policy-r1", with_golden=False)
    assert counts["rows"] == 3 and counts["golden_responses"] == 0  # b has no second response now
    assert all("golden" not in r["sources"] for r in rows)


def test_rounds_take_the_next_prompts_wrapping_around() -> None:
    prompts = pa.table({"id": [str(i) for i in range(10)], "prompt": [f"p{i}" for i in range(10)]})
    ids = lambda r, n: loop.round_prompts(prompts, r, n).column("id").to_pylist()
    assert ids(1, 4) == ["0", "1", "2", "3"] and ids(2, 4) == ["4", "5", "6", "7"]
    assert ids(3, 4) == ["8", "9", "0", "1"] and ids(4, 4) == ["2", "3", "4", "5"]
    assert ids(2, None) == ids(2, 10) == ids(3, 12) == [str(i) for i in range(10)]


def test_the_loop_refuses_what_cannot_run_before_sampling(tmp_path: Path) -> None:
    data_dir = tmp_path / "run" / "data"
    with pytest.raises(FileNotFoundError, match="no validated training data"):
        loop.check(load_config(None, [f"root={tmp_path}", "name=run"]), tmp_path / "run", 1)
    data_dir.mkdir(parents=True)
    (data_dir / "_SUCCESS").write_text("{}")
    cases = [
        (["data.input=mine.jsonl"], "scores the synthetic benchmark"),
        (["train.loss=dpo_pl"], "listwise"),
        (["train.objective=dora", "loop.keep_golden=false"], "needs golden responses"),
        (["generate.actors=0"], "set generate.actors >= 1"),  # live generators; without them 0 samples in-process
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            loop.check(load_config(None, [f"root={tmp_path}", "name=run", *overrides]), tmp_path / "run", 1)
    with pytest.raises(ValueError, match="rounds must be"):
        loop.check(load_config(None, [f"root={tmp_path}", "name=run"]), tmp_path / "run", 0)


def test_loop_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"loop\.samples"):
        load_config(None, ["loop.samples=1"])
    with pytest.raises(ConfigError, match=r"loop\.temperature"):
        load_config(None, ["loop.temperature=0"])


def test_a_round_links_its_baseline_from_the_last_rounds_policy_samples(tmp_path: Path) -> None:
    """Round r's baseline (its starting policy, on the evaluation prompts) is round r-1's policy folder when the
    fingerprints agree: hard-linked with its marker, so the stage finds it up to date; never from another model."""
    from raydora import generate as gen
    from raydora.rundir import is_done, write_success

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    cfg = load_config(None, [f"root={tmp_path}", "name=run", f"generate.prompts={prompts}"])
    run_dir = cfg.run_dir.absolute()
    policy = run_dir / "loop" / "round1" / "train" / "final"  # what round 1 trained, round 2's starting policy
    policy.mkdir(parents=True)
    (policy / "model.safetensors").write_bytes(b"weights of round 1")
    round2 = loop.round_config(cfg, run_dir, 2, policy)
    [(name, model, out, fp)] = gen.plan(round2, round2.run_dir.absolute())[2]
    assert (name, model, out) == ("sft", policy, run_dir / "loop" / "round2" / "generations" / "sft")
    previous = run_dir / "loop" / "round1" / "generations" / "policy"
    assert not loop.reuse_baseline(round2, 2, run_dir)  # round 1 sampled nothing yet
    previous.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "generations": [["x", "y"]]}), previous / "part-000000.parquet")
    write_success(previous, {"stage": "generate", "fingerprint": "another model's"})
    assert not loop.reuse_baseline(round2, 2, run_dir) and not out.exists()
    write_success(previous, {"stage": "generate", "fingerprint": fp, "weights_version": 1})
    assert loop.reuse_baseline(round2, 2, run_dir) and is_done(out, fp)
    assert read_success(out)["weights_version"] == 1
    a, b = out / "part-000000.parquet", previous / "part-000000.parquet"
    assert a.stat().st_ino == b.stat().st_ino  # linked, not sampled or copied
    assert not loop.reuse_baseline(round2, 2, run_dir)  # up to date: nothing to do
    assert not loop.reuse_baseline(loop.round_config(cfg, run_dir, 1, policy), 1, run_dir)  # round 1 has no r-1


TINY = [
    "synth.rows=48", "synth.k=4", "synth.eval_rows=8", "model.policy=tiny-gpt2", "model.precision=fp32",
    "model.max_length=64", "sft.enabled=false", "classifier.backbone=tiny-bert", "classifier.epochs=1",
    "classifier.score_actors=1", "classifier.num_workers=0", "reference.actors=1", "train.loss=dpo",
    "train.objective=dora", "train.batch_size=8", "train.micro_batch_size=8", "train.num_workers=0",
    "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0.0", "generate.backend=hf", "generate.actors=1",
    "generate.max_new_tokens=12", "generate.temperature=1.0", "evaluate.prompts=8", "evaluate.bootstrap=100",
    "loop.rounds=2", "loop.samples=3", "loop.prompts=24", "loop.reward=biased",
]  # fmt: skip


@pytest.mark.slow  # 255 s: two rounds of six stages; the default tier tests labelling, prompts and checks
@pytest.mark.usefixtures("ray_session")
def test_two_rounds_train_each_policy_from_the_last_on_its_own_labelled_samples(tmp_path: Path) -> None:
    cfg = load_config(None, [f"root={tmp_path}", "name=run", *TINY])
    run_dir = cfg.run_dir.absolute()
    synth.run(cfg, run_dir)
    validate.run(cfg, run_dir)
    summaries = loop.run(cfg)
    data_rows = {x["id"]: x for x in pq.read_table(run_dir / "data").to_pylist()}
    assert [s["round"] for s in summaries] == [1, 2]
    assert summaries[0]["start_policy"] == str(run_dir / "init")  # nothing trained yet: the initial policy
    assert summaries[1]["start_policy"] == summaries[0]["policy"]
    for s in summaries:
        r = s["round"]
        rd = run_dir / "loop" / f"round{r}"
        assert s["rows"] + s["dropped"] == s["prompts"] == 24
        # The round's rows: the policy's distinct samples, then the prompt's golden responses from data/ (those
        # that are not also a sample), all labelled by the benchmark's biased labeller.
        rows = pq.read_table(rd / "input" / "preferences.parquet").to_pylist()
        samples = {x["id"]: x["generations"] for x in pq.read_table(rd / "samples").to_pylist()}
        assert len(samples) == 24 and len(rows) == s["rows"] >= 8
        ids = {x.removeprefix(f"policy-r{r}-") for x in (row["id"] for row in rows)}
        assert ids <= set(samples) and (r == 1) == ("synth-0-000000000" in samples)  # round 2: the next 24 prompts
        for row in rows:
            pid = row["id"].removeprefix(f"policy-r{r}-")
            own = list(dict.fromkeys(g for g in samples[pid] if g.strip()))
            src = data_rows[pid]
            golden = [
                x for x, y in zip(src["responses"], src["sources"], strict=True) if y == "golden" and x not in own
            ]
            assert row["responses"] == own + golden
            assert row["sources"] == [f"policy-r{r}"] * len(own) + ["golden"] * len(golden)
            expected = [synth.biased_score(row["prompt"], x) for x in row["responses"]]
            np.testing.assert_allclose(row["scores"], expected, rtol=1e-12)
        assert read_success(rd / "data")["rows"] == {"input": len(rows), "valid": len(rows), "quarantined": 0}
        # One classifier: golden vs this round's samples.
        assert read_success(rd / "classifier")["sources"] == [f"policy-r{r}"]
        # The round starts from, and is referenced against, the previous policy; its training moved the weights.
        assert load_config(rd / "config.yaml").model.policy == s["start_policy"]
        before = load_file(f"{s['start_policy']}/model.safetensors")
        after = load_file(f"{s['policy']}/model.safetensors")
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert set(s["win_rates"]) >= {"sft", "golden"} and 0 <= s["win_rates"]["sft"] <= 1
    assert json.loads((run_dir / "loop" / "summary.json").read_text()) == summaries
    assert summaries[0]["sample_reward_mean"] != summaries[1]["sample_reward_mean"]
    # One pool of generators for the whole loop: round 2 sampled round 1's policy after a weight sync (version 1),
    # and its samples equal those of generator actors started fresh from that policy's folder.
    versions = {
        f"round{r}/{f}": read_success(run_dir / "loop" / f"round{r}" / f)["weights_version"]
        for r in (1, 2) for f in ("samples", "generations/sft", "generations/policy")
    }  # fmt: skip
    assert versions == {
        "round1/samples": 0, "round1/generations/sft": 0, "round1/generations/policy": 1,
        "round2/samples": 1, "round2/generations/sft": 1, "round2/generations/policy": 2,
    }  # fmt: skip
    from raydora import generate as gen

    marker = read_success(run_dir / "loop" / "round2" / "samples")
    prompts = pq.read_table(run_dir / "loop" / "round2" / "samples").select(["id", "prompt"])
    gen.generate(summaries[0]["policy"], prompts, tmp_path / "fresh", cfg.generate,
                 gen.Sampling(**marker["sampling"]), max_length=64, precision="fp32")  # fmt: skip
    fresh, live = (
        gen.read_generations(tmp_path / "fresh"),
        gen.read_generations(run_dir / "loop" / "round2" / "samples"),
    )
    assert fresh.column("generations").to_pylist() == live.column("generations").to_pylist()
    # Round 2's baseline is round 1's policy samples, linked rather than sampled again.
    linked = [run_dir / "loop" / f"round{r}" / "generations" / f for r, f in ((1, "policy"), (2, "sft"))]
    assert gen.read_generations(linked[0]).equals(gen.read_generations(linked[1]))
    inodes = [{p.stat().st_ino for p in folder.glob("*.parquet")} for folder in linked]
    assert inodes[0] == inodes[1]
    # Rerunning finds every round up to date: nothing is sampled or trained again.
    markers = {f: f.stat().st_mtime_ns for f in sorted((run_dir / "loop").glob("round*/*/_SUCCESS"))}
    assert len(markers) >= 2 * 6
    assert loop.run(cfg) == summaries
    assert {f: f.stat().st_mtime_ns for f in markers} == markers
