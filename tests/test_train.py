"""Ray Train policy optimisation: real 1- and 2-worker runs on a tiny GPT-2 over the synthetic benchmark."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raydora import checkpoint, classify, plan, reference, sft, synth, train, validate
from raydora.cluster import check_gpus
from raydora.config import load_config
from tests.faults import CrashOnce, PoisonStep, RaiseOnce

BASE = [
    "synth.rows=96",
    "synth.k=4",
    "synth.eval_rows=8",
    "classifier.backbone=tiny-bert",
    "classifier.epochs=1",
    "classifier.score_actors=1",
    "classifier.num_workers=0",  # in this process: the 1- and 2-worker runs are in test_classifier.py
    "model.policy=tiny-gpt2",
    "model.precision=fp32",
    "model.max_length=64",
    "sft.enabled=false",
    "train.loss=dpo",
    "train.objective=dora",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.num_workers=2",
    "train.lr=1e-3",
    "train.warmup_ratio=0.0",
    "train.checkpoint_every=3",
    "train.max_steps=6",
]


def config(root: Path, *overrides: str):
    return load_config(None, [f"root={root}", "name=run", *BASE, *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_session) -> Path:
    """synth -> validate -> classify -> reference, once for the module."""
    root = tmp_path_factory.mktemp("train")
    cfg = config(root)
    for stage in (synth.run, validate.run, classify.run, reference.run):
        stage(cfg, cfg.run_dir)
    return cfg.run_dir.absolute()


def fit(run_dir: Path, out: str, *overrides: str, master_dtype: str = "float32", callbacks=()):
    cfg = config(run_dir.parent, *overrides)
    return train.fit(
        mode="train", data_dir=run_dir / "reference", model_dir=reference.initial_policy(cfg, run_dir),
        out_dir=run_dir / out, run_cfg=cfg, train=cfg.train,
        options=train.WorkerOptions(master_dtype=master_dtype, callbacks=tuple(callbacks)),
    )  # fmt: skip


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_reference_logps_equal_the_policy_at_step_zero(run_dir: Path) -> None:
    from raydora.encoding import forward_logps, pad_sequences
    from raydora.models import load_causal_lm

    table = pq.read_table(sorted((run_dir / "reference").glob("*.parquet"))[0]).slice(0, 6).to_pylist()
    model = load_causal_lm(run_dir / "init", dtype=torch.float32, attn_implementation="eager").eval()
    enc = pad_sequences([r["prompt_ids"] for r in table], [r["response_ids"] for r in table], None, 1)
    with torch.no_grad():
        logps, lengths, _ = forward_logps(model, enc, 4)
    expected = torch.tensor([r["reference_logps"] for r in table], dtype=torch.float64)
    assert torch.allclose(logps.double(), expected, atol=1e-4, rtol=1e-5)
    assert (lengths > 0).all() and (expected < 0).all()
    # Training tokenises exactly like the reference pass: the response ids end with EOS.
    assert all(ids[-1] == 0 or len(ids) >= 1 for r in table for ids in r["response_ids"])


def test_the_reference_pass_in_this_process_equals_the_actor_pool(run_dir: Path, tmp_path: Path) -> None:
    # The module's reference/ came from one actor; reference.actors=0 runs the same pass in this process.
    cfg = config(run_dir.parent)
    here = reference.encode_rows(
        reference.reference_input(run_dir), tmp_path / "here", model_dir=reference.initial_policy(cfg, run_dir),
        tokenizer=reference.tokenizer_dir(cfg, run_dir), max_length=cfg.model.max_length, stage="reference", fp="x",
        cfg=dataclasses.replace(cfg.reference, actors=0, batch_size=5), precision=cfg.model.precision,
    )  # fmt: skip
    pool = [r for f in sorted((run_dir / "reference").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    files = sorted(p.name for p in (tmp_path / "here").glob("*.parquet"))
    ours = [r for f in files for r in pq.read_table(tmp_path / "here" / f).to_pylist()]
    assert here == len(ours) == len(pool) == 96  # in batches of 5, in order
    # The same files as the pool's: the training plan's shuffle blocks end at file ends.
    assert files == sorted(p.name for p in (run_dir / "reference").glob("*.parquet"))
    for a, b in zip(pool, ours, strict=True):
        assert a["reference_logps"] == pytest.approx(b["reference_logps"], rel=1e-6, abs=1e-6)
        assert {k: v for k, v in a.items() if k != "reference_logps"} == {
            k: v for k, v in b.items() if k != "reference_logps"
        }


def test_two_workers_train_the_policy(run_dir: Path) -> None:
    result = fit(run_dir, "two", "train.max_steps=0", "train.epochs=2", "train.checkpoint_every=100")
    out = run_dir / "two"
    rows = metrics(out)
    assert [m["step"] for m in rows] == list(range(1, 25))  # 96 rows / 8 = 12 steps x 2 epochs, in order
    first = rows[0]
    for key in ("loss", "loss/unweighted", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "robust/ess", "robust/weight_max", "robust/weight_entropy", "lr", "grad_norm",
                "pairs_per_s", "tokens_per_s"):  # fmt: skip
        assert key in first and np.isfinite(first[key]), key
    # Step 1 runs at the initial weights, which are the reference: the implicit rewards are zero.
    assert abs(first["rewards/chosen"]) < 1e-5 and abs(first["rewards/rejected"]) < 1e-5
    early = np.mean([m["loss/unweighted"] for m in rows[:4]])
    late = np.mean([m["loss/unweighted"] for m in rows[-4:]])
    assert late < early - 0.05, (early, late)
    before, after = weights(run_dir / "init"), weights(out / "final")
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"parameters that did not train: {unchanged}"
    assert result.counts == {"rows": 96, "steps": 24}
    # Rerunning the finished stage skips it.
    assert fit(run_dir, "two", "train.max_steps=0", "train.epochs=2", "train.checkpoint_every=100").skipped


# dora (110 s: three runs) is in the slow tier; the default tier keeps kldpo here, DoRA's global batch across gloo
# ranks (test_robust_distributed.py) and under FSDP2 accumulation (test_train_step.py).
@pytest.mark.parametrize("objective", [pytest.param("dora", marks=pytest.mark.slow), "kldpo"])
def test_two_workers_equal_one_worker_with_twice_the_batch(run_dir: Path, objective: str) -> None:
    # 1 process (num_workers=0, the driver): 8 rows per step in 2 micro-batches of 4; 2 workers: 4 rows each in 2 micro-batches of 2. Both
    # accumulate in one pass (robust.OnlineTilt); the 2 workers' per-rank factors meet in the mean all-reduce.
    # For dora also 2 workers x 1 micro-batch of 4 (the objective's own all-gather, group=), with the token width
    # rounded up to a multiple of 32 (model.pad_to_multiple_of: more masked tokens, the same result). The 2-worker
    # runs take the head's log-probs in chunks of 3 tokens (model.logprob_chunk, in no fingerprint): the same result.
    common = (f"train.objective={objective}", "train.max_steps=4", "train.checkpoint_every=100")
    fit(run_dir, f"w1-{objective}", *common, "train.num_workers=0", master_dtype="float64")  # in this process
    chunked = ("train.num_workers=2", "model.logprob_chunk=3")
    fit(run_dir, f"w2-{objective}", *common, *chunked, "train.micro_batch_size=2", master_dtype="float64")
    others = [f"w2-{objective}"]
    if objective == "dora":
        fit(run_dir, "w2g-dora", *common, *chunked, "model.pad_to_multiple_of=32", master_dtype="float64")
        others.append("w2g-dora")
    a, init = weights(run_dir / f"w1-{objective}" / "final"), weights(run_dir / "init")
    ma = metrics(run_dir / f"w1-{objective}")
    for other in others:
        b = weights(run_dir / other / "final")
        for k in a:
            assert not torch.equal(a[k], init[k].to(a[k].dtype))
            torch.testing.assert_close(a[k], b[k], atol=1e-9, rtol=1e-7)
        mb = metrics(run_dir / other)
        np.testing.assert_allclose([m["loss"] for m in ma], [m["loss"] for m in mb], rtol=1e-9)
        # The gradient's scale too (AdamW's update barely sees it: a gradient off by the world size would pass the
        # weight check above).
        np.testing.assert_allclose([m["grad_norm"] for m in ma], [m["grad_norm"] for m in mb], rtol=1e-7)


def test_fsdp2_shards_and_trains_like_ddp(run_dir: Path) -> None:
    # Micro-batches of 2: both accumulate in one pass (online softmax). DDP scales each rank's share before its
    # one all-reduce; FSDP2 reduce-scatters every micro-batch and shares the running max (fsdp_grad_sync).
    common = ("train.objective=kldpo", "train.max_steps=4", "train.num_workers=2", "train.micro_batch_size=2")
    # The DDP run of the equality test above: skipped (its _SUCCESS fingerprint matches) when that test made it.
    made = (run_dir / "w2-kldpo" / "_SUCCESS").exists()
    assert fit(run_dir, "w2-kldpo", *common, "train.checkpoint_every=100", master_dtype="float64").skipped == made
    fit(run_dir, "fsdp", *common, "train.checkpoint_every=2", "train.strategy=fsdp", master_dtype="float64")
    ddp, fsdp = weights(run_dir / "w2-kldpo" / "final"), weights(run_dir / "fsdp" / "final")
    assert sorted(ddp) == sorted(fsdp)  # tied embeddings stay tied in the saved folder
    for k in ddp:
        torch.testing.assert_close(ddp[k], fsdp[k], atol=1e-9, rtol=1e-7)
    assert checkpoint.latest_step(run_dir / "fsdp") == 4


def test_a_killed_worker_recovers_and_a_rerun_resumes(run_dir: Path, tmp_path: Path, capsys) -> None:
    # The uninterrupted run trains in this process; in float64 it equals the 2-worker runs (the equality test above)
    # to 1e-9, so the comparisons below are tighter than fp32 rounding would allow. Batches of 32 make an epoch of
    # 3 steps (96 rows): the crash below lands at the epoch boundary (checkpoint: step 3, the end of epoch 0; the
    # next step opens epoch 1), where a resume must start the next epoch's order, not repeat or skip one.
    f64 = {"master_dtype": "float64"}
    epochs = ("train.batch_size=32", "train.micro_batch_size=8", "train.epochs=2")
    fit(run_dir, "straight", *epochs, "train.num_workers=0", **f64)
    assert json.loads((run_dir / "straight" / "metrics.jsonl").read_text().splitlines()[3])["epoch"] == 1
    # A hard crash (os._exit) of worker 1 at step 4, after the step-3 checkpoint: Ray Train restarts the group
    # from that checkpoint and finishes. The result equals the uninterrupted run.
    fit(run_dir, "recovered", *epochs, callbacks=[CrashOnce(4, str(tmp_path / "failed-once"))], **f64)
    assert (tmp_path / "failed-once").exists()
    straight, recovered = weights(run_dir / "straight" / "final"), weights(run_dir / "recovered" / "final")
    for k in straight:
        torch.testing.assert_close(straight[k], recovered[k], atol=1e-9, rtol=1e-7)
    assert [m["step"] for m in metrics(run_dir / "recovered")] == list(range(1, 7))
    # With no failures allowed the crash ends the run; rerunning the same config resumes from step 3.
    with pytest.raises(Exception):  # noqa: B017 - Ray's TrainingFailedError
        fit(run_dir, "resumed", *epochs, "train.max_failures=0", callbacks=[CrashOnce(4, str(tmp_path / "once-more"))],
            **f64)  # fmt: skip
    assert checkpoint.latest_step(run_dir / "resumed") == 3 and not (run_dir / "resumed" / "final").exists()
    # A newer checkpoint cut short (as a node lost mid-copy leaves it): the rerun passes over it, says so, and
    # resumes from step 3 (Ray Train's snapshot never saw it; checkpoint.pick_resume agrees with the driver).
    good = checkpoint.latest_checkpoint(run_dir / "resumed")[1]
    assert good is not None
    cut = Path(shutil.copytree(good, good.parent / "checkpoint_9999-12-31_23-59-59.000000"))
    manifest = json.loads((cut / checkpoint.MANIFEST).read_text())
    (cut / checkpoint.MANIFEST).write_text(json.dumps({**manifest, "step": 5}))
    (cut / "state.pt").write_bytes((cut / "state.pt").read_bytes()[:100])
    capsys.readouterr()
    fit(run_dir, "resumed", *epochs, "train.max_failures=0", **f64)
    assert f"[checkpoint] skipping step 5 ({cut}): state.pt has 100 bytes" in capsys.readouterr().out
    resumed = weights(run_dir / "resumed" / "final")
    for k in straight:
        torch.testing.assert_close(straight[k], resumed[k], atol=1e-9, rtol=1e-7)


def test_local_mode_trains_in_this_process_keeps_its_checkpoints_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    # train.num_workers=0: the loop runs in this process, as in Ray Train's local mode (no worker actors, no restarts).
    # It keeps its checkpoints where Ray Train would, so a rerun after a crash resumes and ends where an
    # uninterrupted run does.
    import os

    common = ("train.num_workers=0", "train.objective=kldpo", "train.max_steps=5", "train.checkpoint_every=2",
              "train.keep_checkpoints=2")  # fmt: skip
    whole = fit(run_dir, "local", *common)
    assert whole.counts == {"rows": 96, "steps": 5}
    worker = json.loads((run_dir / "local" / "workers" / "rank0.json").read_text())
    assert worker["pid"] == os.getpid() and worker["world_size"] == 1
    kept = sorted(p.name for p in (run_dir / "local" / "checkpoints").iterdir())
    assert kept == ["checkpoint_local_00000004", "checkpoint_local_00000005"]  # steps 2, 4, 5: the newest 2 kept
    with pytest.raises(RuntimeError, match="injected failure before step 4"):
        fit(run_dir, "local-crash", *common, callbacks=[RaiseOnce(4, str(tmp_path / "raised"))])
    assert checkpoint.latest_step(run_dir / "local-crash") == 2
    fit(run_dir, "local-crash", *common)
    assert [m["step"] for m in metrics(run_dir / "local-crash")] == [1, 2, 3, 4, 5]
    a, b = weights(run_dir / "local" / "final"), weights(run_dir / "local-crash" / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_lora_trains_adapters_saves_merged_weights_and_resumes(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    common = ("train.lora_r=4", "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-2")
    fit(run_dir, "lora", *common, "train.num_workers=0")  # in this process; the killed run below is on 2 workers
    # Checkpoints hold the adapters only (a PEFT folder and the trainable state), not the model.
    step, ckpt = checkpoint.latest_checkpoint(run_dir / "lora")
    assert step == 4 and ckpt is not None and not (ckpt / "model").exists()
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
    saved = load_file(str(ckpt / checkpoint.TRAINER_STATE))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    adapter = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))  # PEFT's names drop the adapter's
    assert sorted(adapter) == sorted(k.replace(".default.", ".") for k in saved)
    for k, v in saved.items():
        torch.testing.assert_close(adapter[k.replace(".default.", ".")], v, atol=0, rtol=0)
    fit(run_dir, "lora-killed", *common, callbacks=[CrashOnce(3, str(tmp_path / "lora-failed"))])
    assert (tmp_path / "lora-failed").exists()
    init, a, b = (
        weights(run_dir / "init"),
        weights(run_dir / "lora" / "final"),
        weights(run_dir / "lora-killed" / "final"),
    )
    assert sorted(a) == sorted(init)  # merged: a plain GPT-2 folder, loadable without peft
    changed = [k for k in init if not torch.equal(init[k], a[k])]
    assert changed and all(k.endswith("weight") for k in changed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


@pytest.mark.slow  # 90 s; the default tier has LoRA under DDP and FSDP2 without LoRA, each against a reference
def test_lora_under_fsdp2_trains_like_ddp_and_checkpoints_the_adapters(run_dir: Path) -> None:
    # FSDP2 shards the frozen base and the adapters alike; only the adapters train, are gathered (the base is
    # never gathered: ignore_frozen_params) and checkpointed. The result equals LoRA under DDP.
    pytest.importorskip("peft")
    common = ("train.lora_r=4", "train.max_steps=4", "train.checkpoint_every=2", "train.lr=1e-2",
              "train.objective=kldpo", "train.num_workers=2")  # fmt: skip
    fit(run_dir, "lora-ddp", *common, master_dtype="float64")
    fit(run_dir, "lora-fsdp", *common, "train.strategy=fsdp", master_dtype="float64")
    ddp, fsdp = weights(run_dir / "lora-ddp" / "final"), weights(run_dir / "lora-fsdp" / "final")
    init = weights(run_dir / "init")
    assert sorted(ddp) == sorted(fsdp) == sorted(init)  # merged weights, tied embeddings still tied
    assert any(not torch.equal(init[k].double(), ddp[k].double()) for k in init)
    for k in ddp:
        torch.testing.assert_close(ddp[k], fsdp[k], atol=1e-9, rtol=1e-7)
    for out in ("lora-ddp", "lora-fsdp"):
        step, ckpt = checkpoint.latest_checkpoint(run_dir / out)
        assert step == 4 and ckpt is not None
        saved = load_file(str(ckpt / checkpoint.TRAINER_STATE))
        assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved), out
    a = load_file(str(checkpoint.latest_checkpoint(run_dir / "lora-ddp")[1] / checkpoint.TRAINER_STATE))
    b = load_file(str(checkpoint.latest_checkpoint(run_dir / "lora-fsdp")[1] / checkpoint.TRAINER_STATE))
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-9, rtol=1e-7)
    la = [m["loss"] for m in metrics(run_dir / "lora-ddp")]
    np.testing.assert_allclose(la, [m["loss"] for m in metrics(run_dir / "lora-fsdp")], rtol=1e-9)


def test_a_nan_loss_stops_the_run_naming_the_step_or_is_skipped(run_dir: Path) -> None:
    with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step 2"):
        fit(run_dir, "nan", "train.max_steps=4", callbacks=[PoisonStep(2)])
    assert not (run_dir / "nan" / "final").exists()
    # The skip path in this process (the same loop; the raise above crossed the Ray Train boundary).
    skip = ("train.max_steps=4", "train.nan_policy=skip", "train.num_workers=0")
    result = fit(run_dir, "nan-skip", *skip, callbacks=[PoisonStep(2)])
    assert result.info["skipped_batches"] == 1
    rows = metrics(run_dir / "nan-skip")
    assert [m["skipped_batches"] for m in rows] == [0, 1, 1, 1]


def test_sft_warm_start_trains_on_the_sft_corpus(run_dir: Path) -> None:
    sft_section = ("sft.enabled=true", "sft.batch_size=16", "sft.micro_batch_size=8", "sft.lr=3e-3")
    cfg = config(run_dir.parent, *sft_section, "sft.num_workers=0")  # in this process
    result = sft.run(cfg, cfg.run_dir)
    rows = metrics(run_dir / "sft")
    assert result.counts == {"rows": 96, "steps": 6} and len(rows) == 6
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert reference.initial_policy(cfg, cfg.run_dir) == run_dir / "sft" / "final"
    from raydora.models import load_causal_lm

    assert load_causal_lm(run_dir / "sft" / "final").config.vocab_size > 0


def test_plan_is_deterministic_and_independent_of_the_worker_count(run_dir: Path) -> None:
    def rows_of(world: int) -> dict[int, list[str]]:
        p = plan.make_plan(run_dir / "reference", batch_size=8, world=world, epochs=2, seed=3, block_rows=16)
        by_step: dict[int, list[str]] = {}
        for r in range(world):
            for e in p.entries:
                for t in plan._read_planned(
                    {k: [e[k]] for k in e}, rank=r, seed=3, columns=["id"],
                    plan={"batch_size": 8, "world": world, "steps_per_epoch": p.steps_per_epoch,
                          "total_steps": p.total_steps, "start_step": 0},
                ):  # fmt: skip
                    for i, s in zip(t.column("id").to_pylist(), t.column("_step").to_pylist(), strict=True):
                        by_step.setdefault(s, []).append(i)
        return by_step

    one, two = rows_of(1), rows_of(2)
    assert sorted(one) == list(range(24))
    assert {s: sorted(v) for s, v in one.items()} == {s: sorted(v) for s, v in two.items()}
    epoch0 = [i for s in range(12) for i in one[s]]
    epoch1 = [i for s in range(12, 24) for i in one[s]]
    assert sorted(epoch0) == sorted(epoch1) and len(set(epoch0)) == 96 and epoch0 != epoch1


def test_gpu_workers_beyond_the_clusters_gpus_fail_fast(ray_session) -> None:
    """Ray Train would wait forever for GPUs the cluster lacks: the stage names the key instead."""
    gpus = ray_session.cluster_resources().get("GPU", 0.0)
    with pytest.raises(ValueError, match=rf"train.num_workers={int(gpus) + 1} GPU workers .* has {gpus:g} GPUs"):
        check_gpus(int(gpus) + 1, 1, "train.num_workers")
    if gpus >= 1:
        check_gpus(int(gpus), 1, "train.num_workers")
