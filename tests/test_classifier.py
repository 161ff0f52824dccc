"""DoRA stage 1 on the synthetic benchmark: classifiers trained on Ray Train (2 DDP workers), calibrated, saved,
and applied by a Ray Data actor pool. Uses the tiny-bert preset (trained from scratch) to stay fast."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raydora import classifier, classify, robust, synth, validate
from raydora.config import ClassifierConfig

# A detector of the artefacts alone reaches AUC ~0.93: 85% of a synthetic source's responses carry the artefact,
# the other 15% are golden-looking answers (coin flips: 0.85 + 0.15 * 0.5 = 0.925; a little more where the
# no-duplicates rule makes their surface forms differ). 0.8 leaves room for a tiny model trained for seconds.
AUC_THRESHOLD = 0.8
SHARES = {"golden": 0.25, "verbose": 0.375, "sloppy": 0.375}  # write_benchmark's default mixture
CFG = ClassifierConfig(backbone="tiny-bert", epochs=2, lr=1e-3, batch_size=32, num_workers=2, holdout_fraction=0.3,
                       score_actors=1, score_batch_size=32, threads_per_worker=1, max_length=48)  # fmt: skip


def _rows(folder: Path) -> list[dict]:
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))]).to_pylist()
    return sorted(rows, key=lambda r: r["id"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, ray_session) -> Path:
    root = tmp_path_factory.mktemp("classify")
    synth.write_benchmark(root / "synth", rows=400, k=4, seed=0, eval_rows=10, block_rows=400)
    validate.validate(root / "synth" / "train", root)
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the stage's progress lines, read by a test below
        result = classifier.train_classifiers(root / "data", root / "classifier", CFG, seed=0)
    (root / "classify.log").write_text(out.getvalue())
    assert result.counts == {"classifiers": 2} and not result.skipped
    return root


PROGRESS = re.compile(r"^\[classify\] (.+?): ([\d,]+)/([\d,]+) (\w+) \((\d+)%\)(.*)$")


def _progress(text: str, what: str) -> list[tuple[int, int, str]]:
    """``(done, total, rest of the line)`` of the ``[classify] what: done/total ...`` lines in ``text``."""
    found = [PROGRESS.match(line) for line in text.splitlines()]
    return [(int(m[2].replace(",", "")), int(m[3].replace(",", "")), m[6]) for m in found if m and m[1] == what]


def test_classifier_training_prints_progress(trained: Path) -> None:
    """Training the classifiers prints examples done out of epochs x training examples (counted by every Train
    worker), rising, with a rate and an ETA, a bounded number of times."""
    lines = _progress((trained / "classify.log").read_text(), "training 2 classifiers")
    examples = 0
    for source in ("verbose", "sloppy"):
        n = json.loads((trained / "classifier" / source / "calibration.json").read_text())["train_examples"]
        examples += n["golden"] + n[source]
    assert len(lines) >= 2, lines
    assert {t for _, t, _ in lines} == {CFG.epochs * examples}
    done = [d for d, _, _ in lines]
    assert done == sorted(done) and 0 < done[0] < done[-1] <= CFG.epochs * examples
    # Ray Train's equal split drops at most one example per worker, source and epoch.
    assert done[-1] >= CFG.epochs * (examples - CFG.num_workers * 2)
    assert any("examples/s" in rest and "ETA" in rest for _, _, rest in lines)
    assert len(lines) <= 10 + 1 + 30  # every 10% and every 10 s: the run takes well under 5 minutes


def test_scoring_prints_progress(scoring: dict[str, Any]) -> None:
    lines = _progress(scoring["log"], "scoring with 2 classifiers")
    assert lines and {t for _, t, _ in lines} == {400} and scoring["one"].counts == {"scored": 400}
    done = [d for d, _, _ in lines]
    assert done == sorted(done) and done[-1] == 400 and "rows/s" in lines[-1][2]


def test_classifiers_separate_the_sources(trained: Path) -> None:
    for source in ("verbose", "sloppy"):
        folder = trained / "classifier" / source
        assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["disjoint_calibration_and_evaluation"]
        assert metrics["after"]["roc_auc"] > AUC_THRESHOLD, (source, metrics)
        assert metrics["after"]["roc_auc"] == metrics["before"]["roc_auc"]  # a temperature keeps the ranking
        # ~120 evaluation examples put ECE's noise floor near 0.05, so this only bounds the harm; the ECE drop is
        # measured on fresh rows below (and on a controlled overconfident model in test_calibration.py).
        assert metrics["after"]["ece"] < metrics["before"]["ece"] + 0.05, (source, metrics)
        cal = json.loads((folder / "calibration.json").read_text())
        n = cal["train_examples"]
        assert cal["gamma"] == pytest.approx(n[source] / n["golden"]) and 1.2 < cal["gamma"] < 1.8  # 3:2 shares
        assert cal["temperature"] > 0


def test_calibration_lowers_the_ece_on_fresh_benchmark_rows(trained: Path) -> None:
    """metrics.json measures before/after on a held-out half of ~120 examples, where ECE (15 bins) has a noise
    floor near 0.05. Here each classifier scores fresh benchmark rows (another seed: ~2,500 golden-vs-source
    examples, noise floor ~0.01) at T = 1 and at its fitted T. Measured with this fixture: sloppy comes out
    underconfident (T ~0.55; MiniLM in the demo also fits T 0.6-0.8) and its ECE drops 0.16 -> 0.10; verbose is
    near calibrated (T ~1.1), and its ECE stays put (0.089 -> 0.089). So: the NLL that T minimises falls for
    both on data it never saw, the ECE never rises beyond the noise, and the miscalibrated one is clearly fixed."""
    from raydora import calibration
    from raydora.models import load_encoder, load_tokenizer

    rows = list(synth.generate_rows(0, 1000, k=4, shares=SHARES, label_noise=0.0, seed=11))
    gains = {}
    for source in ("verbose", "sloppy"):
        folder = trained / "classifier" / source
        model, tok = load_encoder(folder).eval(), load_tokenizer(folder)
        t = json.loads((folder / "calibration.json").read_text())["temperature"]
        pairs = [(r["prompt"], x, int(s == "golden")) for r in rows
                 for x, s in zip(r["responses"], r["sources"], strict=True) if s in ("golden", source)]  # fmt: skip
        z = np.concatenate([classifier.margins(model, tok, [p for p, _, _ in pairs[i : i + 256]],
                                               [x for _, x, _ in pairs[i : i + 256]], CFG.max_length)
                            for i in range(0, len(pairs), 256)])  # fmt: skip
        y = np.array([label for _, _, label in pairs])
        assert calibration.nll(z, y, t) < calibration.nll(z, y), (source, t)
        before = calibration.ece(calibration.sigmoid(z), y)
        after = calibration.ece(calibration.sigmoid(z / t), y)
        assert after < before + 0.005, (source, t, before, after)
        gains[source] = before - after
    assert max(gains.values()) > 0.03, gains


def test_rerun_skips_trained_classifiers(trained: Path) -> None:
    again = classifier.train_classifiers(trained / "data", trained / "classifier", CFG, seed=0)
    assert again.skipped


@pytest.fixture(scope="module")
def serial(trained: Path) -> Path:
    """Both classifiers trained in turn in this process (classifier.num_workers=0, no Ray Train): the same loop and
    data order as a 1-worker Ray Train run. Its progress lines go to ``clf-serial.log``."""
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        result = classifier.train_classifiers(
            trained / "data", trained / "clf-serial", dataclasses.replace(CFG, num_workers=0), seed=0
        )
    assert torch.get_num_threads() == threads  # CFG's threads_per_worker=1 applied while training, then restored
    (trained / "clf-serial.log").write_text(out.getvalue())
    assert result.counts == {"classifiers": 2} and not result.skipped
    return trained / "clf-serial"


def test_one_run_trains_each_source_as_if_alone(trained: Path, serial: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """All sources train in one run, one after another. Each classifier must not depend on the others (each starts
    from the seed): training verbose alone gives the same weights, bit for bit, as training it second, after sloppy
    (sources train in sorted order). Checked on the in-process loop, the one Ray Train's workers run (the test below
    shows the two bitwise equal)."""
    real = classifier.synthetic_sources
    monkeypatch.setattr(classifier, "synthetic_sources", lambda d: {k: v for k, v in real(d).items() if k != "sloppy"})
    cfg = dataclasses.replace(CFG, num_workers=0)
    alone = classifier.train_classifiers(trained / "data", trained / "verbose-alone", cfg, seed=0)
    assert alone.counts == {"classifiers": 1}
    a = load_file(str(serial / "verbose" / "model.safetensors"))
    b = load_file(str(trained / "verbose-alone" / "verbose" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    both = json.loads((serial / "verbose" / "calibration.json").read_text())
    assert json.loads((trained / "verbose-alone" / "verbose" / "calibration.json").read_text()) == both


def test_concurrent_runs_train_the_same_classifiers(trained: Path, serial: Path) -> None:
    """classifier.concurrency=2: each source trained by its own Ray Train run (one worker each, both runs at once
    on the 2-CPU test cluster) gives the same weights and calibration, bit for bit, as training them in turn in
    this process (classifier.num_workers=0, no Ray Train; the same loop on the same data order); and concurrency
    is not part of the stage's fingerprint."""
    cfg = dataclasses.replace(CFG, num_workers=1)
    assert " training examples x 2 epochs; in this process on cpu\n" in (trained / "clf-serial.log").read_text()
    two = classifier.train_classifiers(trained / "data", trained / "clf-concurrent",
                                       dataclasses.replace(cfg, concurrency=2), seed=0)  # fmt: skip
    assert two.counts == {"classifiers": 2} and not two.skipped
    runs = [
        json.loads((trained / d / "_SUCCESS").read_text())["training_runs"] for d in ("clf-serial", "clf-concurrent")
    ]
    assert runs == [[["sloppy", "verbose"]], [["sloppy"], ["verbose"]]]
    assert not list(serial.glob(".*"))  # the in-process run's folder went with the staging
    for source in ("sloppy", "verbose"):
        a = load_file(str(serial / source / "model.safetensors"))
        b = load_file(str(trained / "clf-concurrent" / source / "model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), source
        calibration = [json.loads((trained / d / source / "calibration.json").read_text())
                       for d in ("clf-serial", "clf-concurrent")]  # fmt: skip
        assert calibration[0] == calibration[1]
    assert classifier.train_classifiers(trained / "data", trained / "clf-concurrent", cfg, seed=0).skipped


def test_a_failed_concurrent_run_stops_the_stage_naming_its_sources(trained: Path) -> None:
    """A classifier whose loss turns non-finite (an absurd learning rate) fails its run; the stage stops with the
    run's sources and the worker's reason once every run has ended, leaves no output folder, and holds no CPU."""
    cfg = dataclasses.replace(CFG, num_workers=1, concurrency=2, lr=1e30, epochs=1)
    with pytest.raises(
        RuntimeError, match=r"(?s)classifier run for sources \['(sloppy|verbose)'\] failed.*loss is nan"
    ):
        classifier.train_classifiers(trained / "data", trained / "clf-nan", cfg, seed=0)
    assert not (trained / "clf-nan").exists()
    # Every run ended and gave its CPUs back (a killed run's placement group kept one, and the next stage hung).
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


@pytest.fixture(scope="module")
def scoring(trained: Path) -> dict[str, Any]:
    """The module's two scoring passes: one actor (its progress lines kept in ``log``), then two actors into
    ``scored2`` as a restarted run finds it after a crash: the marker lost, stale rows in the folder and a
    half-written staging folder beside it (``stale``: those rows)."""
    with contextlib.redirect_stdout(io.StringIO()) as out:  # the stage's progress lines, read by a test above
        one = classify.score(trained / "data", trained / "classifier", trained / "scored1", CFG)
    (trained / ".scored2.tmp-deadbeef").mkdir()
    (trained / "scored2").mkdir()
    stale = [{**r, "p_golden": [0.5] * len(r["p_golden"])} for r in _rows(trained / "scored1")[:7]]
    pq.write_table(pa.Table.from_pylist(stale), trained / "scored2" / "part-000099.parquet")
    two = classify.score(trained / "data", trained / "classifier", trained / "scored2",
                        ClassifierConfig(**{**CFG.__dict__, "score_actors": 2}))  # fmt: skip
    shutil.rmtree(trained / ".scored2.tmp-deadbeef")
    assert one.counts == two.counts == {"scored": 400}
    return {"one": one, "two": two, "log": out.getvalue(), "stale": stale}


@pytest.fixture(scope="module")
def scored(scoring: dict[str, Any], trained: Path) -> tuple[Path, Path]:
    return trained / "scored1", trained / "scored2"


def test_two_actors_give_identical_p_golden(scored: tuple[Path, Path]) -> None:
    a, b = (_rows(d) for d in scored)
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert [r["p_golden"] for r in a] == [r["p_golden"] for r in b]
    assert [r["p_golden_by_source"] for r in a] == [r["p_golden_by_source"] for r in b]


def test_golden_responses_score_high(scored: tuple[Path, Path]) -> None:
    rows = _rows(scored[0])
    by: dict[str, list[float]] = {}
    for r in rows:
        assert len(r["p_golden"]) == len(r["responses"]) and all(0 < p < 1 for p in r["p_golden"])
        for s, p in zip(r["sources"], r["p_golden"], strict=True):
            by.setdefault(s, []).append(p)
    assert np.mean(by["golden"]) > 0.6 > max(np.mean(by["verbose"]), np.mean(by["sloppy"]))


def test_weights_from_p_golden_match_dora_weights_by_hand(trained: Path, scored: tuple[Path, Path]) -> None:
    """Synthetic response of source s: w = 1 / (alpha + pi_s (1-p) / (gamma_s p)) with its own classifier's p.
    Golden response: w = 1 / (alpha + sum_i beta_i / r_i), r_i = gamma_i c_i / (1 - c_i), the mixture density ratio."""
    marker = json.loads((scored[0] / "_SUCCESS").read_text())
    order, shares, alpha = marker["classifiers"], marker["shares"], marker["golden_share"]
    gammas = {s: json.loads((trained / "classifier" / s / "calibration.json").read_text())["gamma"] for s in order}
    assert alpha == pytest.approx(0.25) and shares == pytest.approx({"verbose": 0.375, "sloppy": 0.375})
    for row in _rows(scored[0])[:40]:
        for src, p, by in zip(row["sources"], row["p_golden"], row["p_golden_by_source"], strict=True):
            if src == "golden":
                expected = 1 / (
                    alpha + sum(shares[s] * (1 - c) / (gammas[s] * c) for s, c in zip(order, by, strict=True))
                )
                got = robust.dora_weights(torch.tensor([p], dtype=torch.float64), 1 - alpha, alpha, eps=1e-6)
            else:
                expected = 1 / (alpha + shares[src] * (1 - p) / (gammas[src] * p))
                got = robust.dora_weights(
                    torch.tensor([p], dtype=torch.float64), shares[src], alpha, gammas[src], eps=1e-6
                )
                assert p == by[order.index(src)]  # a synthetic response is scored by its own classifier
            assert float(got[0]) == pytest.approx(expected, rel=1e-9)
            assert 0 < expected < 1 / alpha


def test_unknown_sources_use_the_mixture_rule(trained: Path) -> None:
    """Relabel every source as unknown: each response then gets the mixture p* from all classifiers."""
    unk = trained / "unknown"
    (unk / "data").mkdir(parents=True)
    for f in sorted((trained / "data").glob("*.parquet")):  # 400 rows: pyarrow in-process, no Ray Data tasks
        b = pq.read_table(f)
        relabelled = pa.array([["unknown"] * len(s) for s in b["sources"].to_pylist()], b.schema.field("sources").type)
        pq.write_table(b.set_column(b.schema.get_field_index("sources"), "sources", relabelled), unk / "data" / f.name)
    classify.score(unk / "data", trained / "classifier", unk / "scored", CFG)
    marker = json.loads((unk / "scored" / "_SUCCESS").read_text())
    shares = np.array([marker["shares"][s] for s in marker["classifiers"]])
    gammas = np.array([json.loads((trained / "classifier" / s / "calibration.json").read_text())["gamma"]
                       for s in marker["classifiers"]])  # fmt: skip
    for row in _rows(unk / "scored")[:20]:
        expected = classify.mixture_p_golden(np.array(row["p_golden_by_source"]), shares, gammas)
        np.testing.assert_allclose(row["p_golden"], expected, rtol=1e-12)


def test_restarted_scoring_skips_or_rewrites_atomically(
    trained: Path, scored: tuple[Path, Path], scoring: dict[str, Any]
) -> None:
    assert classify.score(trained / "data", trained / "classifier", scored[0], CFG).skipped
    # scored2's pass found what a crash leaves (a half-written staging folder, stale rows, no marker): it
    # rewrote the output whole, with the rows of a clean pass (scored1)
    redo, out = scoring["two"], scored[1]
    assert not redo.skipped and (out / "_SUCCESS").is_file()
    assert _rows(out) == _rows(scored[0]) and not any(r in scoring["stale"] for r in _rows(out))


def _retrain(trained: Path, **change: str) -> tuple[ClassifierConfig, Path, Any]:
    """Train the module's classifiers again with one setting changed, into ``classifier_<value>``: a new
    fingerprint, so the stage runs rather than skips."""
    cfg = ClassifierConfig(**{**CFG.__dict__, **change})
    out = trained / f"classifier_{next(iter(change.values()))}"
    result = classifier.train_classifiers(trained / "data", out, cfg, seed=0)
    assert not result.skipped
    plain = json.loads((trained / "classifier" / "_SUCCESS").read_text())
    assert json.loads((out / "_SUCCESS").read_text())["fingerprint"] != plain["fingerprint"]
    return cfg, out, result


def test_platt_calibration_refits_only_the_calibration_and_scoring_applies_its_bias(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """classifier.calibration=platt over finished classifiers (a copy of the module's, trained with the default
    temperature): a new fingerprint; no training (the weights kept bit for bit, the same uncalibrated held-out
    metrics: the margins saved in holdout.npy), a fitted bias; scoring then gives p_golden = sigmoid(z / T + b)
    with the classifier's own margins z. Folders without the saved margins (made before them) train again."""
    from raydora import calibration
    from raydora.models import load_encoder, load_tokenizer

    def no_training(*args: Any) -> None:
        raise AssertionError("a change of classifier.calibration alone must not train")

    cfg, out = ClassifierConfig(**{**CFG.__dict__, "calibration": "platt"}), trained / "classifier_platt"
    shutil.copytree(trained / "classifier", out)
    monkeypatch.setattr(classifier, "_fit_group", no_training)
    result = classifier.train_classifiers(trained / "data", out, cfg, seed=0)
    assert not result.skipped and json.loads((out / "_SUCCESS").read_text())["recalibrated"]
    plain = json.loads((trained / "classifier" / "_SUCCESS").read_text())
    assert json.loads((out / "_SUCCESS").read_text())["fingerprint"] != plain["fingerprint"]
    assert classifier.train_classifiers(trained / "data", out, cfg, seed=0).skipped
    for source in ("verbose", "sloppy"):
        assert (out / source / "model.safetensors").read_bytes() == (
            trained / "classifier" / source / "model.safetensors"
        ).read_bytes()
        cal = json.loads((out / source / "calibration.json").read_text())
        metrics = json.loads((out / source / "metrics.json").read_text())
        before = json.loads((trained / "classifier" / source / "metrics.json").read_text())["before"]
        assert cal["calibration"] == metrics["method"] == "platt" and cal["bias"] != 0.0 and cal["temperature"] > 0
        assert metrics["before"] == before
        assert result.info[source]["bias"] == cal["bias"]
    classify.score(trained / "data", out, trained / "scored_platt", cfg)
    rows = _rows(trained / "scored_platt")[:10]
    for source in ("verbose", "sloppy"):
        cal = json.loads((out / source / "calibration.json").read_text())
        model, tok = load_encoder(out / source).eval(), load_tokenizer(out / source)
        picked = [(r["prompt"], x, p) for r in rows
                  for x, s, p in zip(r["responses"], r["sources"], r["p_golden"], strict=True) if s == source]  # fmt: skip
        z = classifier.margins(model, tok, [a for a, _, _ in picked], [b for _, b, _ in picked], CFG.max_length)
        expected = calibration.calibrated(z, cal["temperature"], cal["bias"])
        np.testing.assert_allclose([p for _, _, p in picked], expected, rtol=1e-6)
    old = trained / "classifier_old"  # as made before holdout.npy was kept: no refit without training
    shutil.copytree(trained / "classifier", old)
    (old / "sloppy" / "holdout.npy").unlink()
    assert classifier._recalibrate(old, "platt", "new") is None


def test_precision_autocasts_the_margins_where_bf16_is_native(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """classifier.precision: fp32 (and null, a ClassifierConfig on its own) are the plain margins; on a CPU
    without native bf16 (patched) auto gives them bit for bit and bf16 is refused; where bf16 is native (patched;
    this CPU has AVX512-BF16), auto autocasts the forward: the margins move, within bf16's rounding."""
    from raydora import hardware
    from raydora.models import load_encoder, load_tokenizer

    folder = trained / "classifier" / "verbose"
    model, tok = load_encoder(folder).eval(), load_tokenizer(folder)
    rows = _rows(trained / "data")[:16]
    prompts, responses = [r["prompt"] for r in rows], [r["responses"][0] for r in rows]
    fp32 = classifier.margins(model, tok, prompts, responses, CFG.max_length)
    np.testing.assert_array_equal(classifier.margins(model, tok, prompts, responses, CFG.max_length, None), fp32)
    # The fingerprints record bf16 only: fp32 folders, all made before the setting, stay valid.
    assert classifier.precision_tag(None, "cpu") is None and classifier.precision_tag("fp32", "cuda") is None
    if not torch.cuda.is_available():  # a driver on a CPU head node takes CUDA's auto for bf16
        assert classifier.precision_tag("auto", "cuda") == "bf16"
    monkeypatch.setattr(hardware, "bf16_native", lambda device, cpuinfo=None: False)
    np.testing.assert_array_equal(classifier.margins(model, tok, prompts, responses, CFG.max_length, "auto"), fp32)
    assert classifier.precision_tag("auto", "cpu") is None
    with pytest.raises(ValueError, match="no native bf16"):
        classifier.margins(model, tok, prompts, responses, CFG.max_length, "bf16")
    with pytest.raises(ValueError, match="no native bf16"):
        classifier.precision_tag("bf16", "cpu")
    monkeypatch.setattr(hardware, "bf16_native", lambda device, cpuinfo=None: True)
    assert classifier.precision_tag("auto", "cpu") == "bf16"
    bf16 = classifier.margins(model, tok, prompts, responses, CFG.max_length, "auto")
    assert not np.array_equal(bf16, fp32)
    np.testing.assert_allclose(bf16, fp32, atol=0.1 * np.abs(fp32).max() + 0.05)
    assert np.corrcoef(bf16, fp32)[0, 1] > 0.99


def test_bf16_classifiers_train_where_native(trained: Path) -> None:
    """classifier.precision=bf16 on a CPU with native bf16 (this one has AVX512-BF16): the Ray Train workers
    autocast the forwards; a new fingerprint, different weights, still separating the sources."""
    from raydora import hardware

    if not hardware.bf16_native("cpu"):
        pytest.skip("this CPU has no native bf16 (AMX / AVX512-BF16)")
    _, out, result = _retrain(trained, precision="bf16")
    for source in ("verbose", "sloppy"):
        a = load_file(str(out / source / "model.safetensors"))
        b = load_file(str(trained / "classifier" / source / "model.safetensors"))
        assert all(v.dtype == torch.float32 for v in a.values())  # autocast: the weights stay fp32
        assert any(not torch.equal(a[k], b[k]) for k in a)
        assert result.info[source]["auc"] > AUC_THRESHOLD, result.info


def test_one_explode_holds_every_source_examples_in_their_own_order(ray_session) -> None:
    """The classify stage explodes the rows once for all sources: filtered to one source, the examples equal
    exploding for that source alone (same rows, same order; golden responses once per source), and split_counts
    counts each source's training examples by hand."""
    import ray.data

    rows = pa.Table.from_pylist([
        {"id": "a", "prompt": "p1", "responses": ["g1", "v1", "s1"], "sources": ["golden", "verbose", "sloppy"]},
        {"id": "b", "prompt": "p2", "responses": ["s2", "g2", "u2"], "sources": ["sloppy", "golden", "unknown"]},
        {"id": "c", "prompt": "p3", "responses": ["v3", "v3b"], "sources": ["verbose", "verbose"]},
    ])  # fmt: skip
    both = classifier.explode(rows, ["sloppy", "verbose"], holdout_fraction=0.5, seed=0).to_pylist()
    for source in ("sloppy", "verbose"):
        alone = classifier.explode(rows, source, holdout_fraction=0.5, seed=0).to_pylist()
        assert [r for r in both if r["source"] == source] == alone
    assert [(r["source"], r["response"], r["label"]) for r in both] == [
        ("sloppy", "g1", 1), ("verbose", "g1", 1), ("verbose", "v1", 0), ("sloppy", "s1", 0),
        ("sloppy", "s2", 0), ("sloppy", "g2", 1), ("verbose", "g2", 1), ("verbose", "v3", 0), ("verbose", "v3b", 0),
    ]  # fmt: skip
    held = {r["id"]: classifier._bucket(r["id"], "holdout-0") < 0.5 for r in rows.to_pylist()}
    want: dict[str, list[int]] = {}
    for r in both:
        if not held[{"p1": "a", "p2": "b", "p3": "c"}[r["prompt"]]]:
            want.setdefault(r["source"], [0, 0])[1 - r["label"]] += 1
    got = classifier.split_counts(ray.data.from_arrow(pa.Table.from_pylist(both)))
    assert got == {s: tuple(v) for s, v in want.items()} and got


def test_classifiers_on_cuda_without_gpus_fail_naming_the_key(trained: Path) -> None:
    """classifier.device=cuda (or auto on a cluster with GPUs) trains on GPU workers; asking for more GPUs than
    the Ray cluster has fails at once, naming the key, instead of waiting forever."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = ClassifierConfig(**{**CFG.__dict__, "device": "cuda"})
    with pytest.raises(ValueError, match=r"classifier\.num_workers=2 GPU workers need 2 GPUs"):
        classifier.train_classifiers(trained / "data", trained / "classifier_cuda", cfg, seed=0)
    assert not (trained / "classifier_cuda").exists()
