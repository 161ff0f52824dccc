"""Faults from the outside (issue 28): real ``raydora`` processes, hit by a signal from this test by pid, or by the
filesystem, never by hooks in the code under test. Each result is compared with an uninterrupted run: weights
bitwise, rows value for value. The subprocesses join this session's Ray (``ray.address``), so no test starts a
second cluster; a killed driver takes only its own job's workers and actors with it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from raydora import checkpoint, classify, generate, reference, rundir, synth, train, validate
from raydora.config import load_config
from raydora.data import parquet_files

BASE = [
    "synth.rows=96",
    "synth.k=2",
    "synth.eval_rows=8",
    "classifier.backbone=tiny-bert",
    "classifier.epochs=1",
    "classifier.score_actors=1",
    "classifier.num_workers=0",  # the classifiers train in the process of the stage (only classify's kill uses them)
    "model.policy=tiny-gpt2",
    "model.precision=fp32",
    "model.max_length=64",
    "sft.enabled=false",
    "train.loss=dpo",
    "train.objective=kldpo",
    "train.batch_size=8",
    "train.micro_batch_size=4",
    "train.num_workers=0",
    "train.lr=1e-3",
    "train.warmup_ratio=0.0",
]
WAIT = 300  # seconds a subprocess may take to reach the point where the fault is injected (a hang fails, never a pass)


def config(root: Path, name: str, *overrides: str):
    return load_config(None, [f"root={root}", f"name={name}", *BASE, *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, ray_session) -> Path:
    """synth -> validate -> reference, once for the module: the uninterrupted outputs (KLDPO needs no classify)."""
    root = tmp_path_factory.mktemp("chaos")
    cfg = config(root, "run")
    for stage in (synth.run, validate.run, reference.run):
        stage(cfg, cfg.run_dir)
    return cfg.run_dir.absolute()


@pytest.fixture(scope="module")
def address(ray_session) -> str:
    return str(ray_session.get_runtime_context().gcs_address)


def raydora(
    run_dir: Path,
    address: str,
    command: str,
    *overrides: str,
    flags: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``raydora <command> [flags]`` on ``run_dir`` in its own process (joining this session's Ray); ``env``: extra
    environment variables."""
    args = [f"root={run_dir.parent}", f"name={run_dir.name}", *BASE, *overrides, f"ray.address={address}"]
    return subprocess.Popen(
        [sys.executable, "-m", "raydora.cli", command, *flags, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for(proc: subprocess.Popen[str], ready: Callable[[], bool], what: str) -> None:
    """Poll until ``ready()``; fail (killing ``proc``) if the process ends or ``WAIT`` passes first."""
    deadline = time.monotonic() + WAIT
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"never saw {what} (exit {proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.02)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out, err


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def straight(run_dir: Path) -> tuple[Path, int]:
    """The uninterrupted training run (in this process): its ``final/`` folder and its step count. Checkpoints do
    not change the weights, so the runs below compare with it whatever their ``train.checkpoint_every``."""
    cfg = config(run_dir.parent, run_dir.name, "train.checkpoint_every=100")
    result = train.fit(
        mode="train", data_dir=run_dir / "reference", model_dir=reference.initial_policy(cfg, run_dir),
        out_dir=run_dir / "straight", run_cfg=cfg, train=cfg.train,
    )  # fmt: skip
    return run_dir / "straight" / "final", int(result.counts["steps"])


def assert_equal_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = weights(a_dir), weights(b_dir)
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- item 7: SIGTERM to the trainer ------------------------------------------------------------------------------
def test_sigterm_checkpoints_the_step_and_the_same_command_resumes_bitwise(
    run_dir: Path, address: str, straight: tuple[Path, int]
) -> None:
    # The loop in the driver process (train.num_workers=0, a `raydora train` command): SIGTERM, as Kubernetes sends
    # before evicting a pod, ends the step in progress, checkpoints it and stops with status 143. No checkpoint is
    # due before the end (checkpoint_every=100): the only one on disk is the preemption's.
    common = ("train.checkpoint_every=100",)
    cfg = config(run_dir.parent, run_dir.name, *common)
    total = straight[1]
    out = run_dir / "train"
    proc = raydora(run_dir, address, "train", *common)
    wait_for(proc, lambda: len(steps(out)) >= 1, "a training step")
    os.kill(proc.pid, signal.SIGTERM)
    code, _, err = finish(proc)
    stopped = checkpoint.latest_step(out)
    assert code == 143, err[-3000:]
    assert 1 <= stopped < total and steps(out) == list(range(1, stopped + 1))  # no step lost, none half-logged
    kept = out / "checkpoints" / f"checkpoint_local_{stopped:08d}"
    assert (
        f"raydora train: stopped by SIGTERM after step {stopped} of {total}; checkpoint {kept}; "
        "run the same command again to resume from it" in err
    )
    assert "Traceback" not in err and not (out / "final").exists() and not (out / "_SUCCESS").exists()
    # The rerun: the stage the command runs, in this process (a second interpreter start-up saved).
    result = train.run(cfg, run_dir)
    assert not result.skipped and steps(out) == list(range(1, total + 1))
    assert_equal_weights(straight[0], out / "final")


# ---- item 1: the trainer killed while it writes a checkpoint -------------------------------------------------------
def test_a_trainer_killed_while_writing_a_checkpoint_resumes_from_the_one_before_bitwise(
    tmp_path: Path, run_dir: Path, address: str, straight: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `raydora train` in the driver process (train.num_workers=0) checkpoints every step: each checkpoint is written
    # into a fresh temp folder (`.raydora-ckpt.tmp-*` under TMPDIR, here a folder of this test's), then moved into
    # checkpoints/. Once a checkpoint is on disk, the test watches TMPDIR; when the next write's folder holds a
    # file but not yet its manifest (the last file written), it stops the process (SIGSTOP) and, if the write is
    # still unfinished, kills it (SIGKILL). A stop that came too late is resumed and the next write tried. The
    # rerun resumes from the newest whole checkpoint and ends bitwise equal to the uninterrupted run; its first
    # checkpoint removes the cut write's folder (its process is gone), so crashes do not fill the temp disk.
    run = upstream_copy(run_dir, "train-killed-mid-checkpoint", "train")
    common = ("train.checkpoint_every=1",)
    cfg = config(run.parent, run.name, *common)
    temp = tmp_path / "temp"
    temp.mkdir()
    out, ckpts = run / "train", run / "train" / "checkpoints"
    proc = raydora(run, address, "train", *common, env={"TMPDIR": str(temp)})
    wait_for(proc, lambda: checkpoint.latest_step(out) >= 1, "a first checkpoint")
    hit: Path | None = None
    deadline = time.monotonic() + WAIT

    def half_written() -> list[Path]:
        found = []
        for d in temp.glob(f".{checkpoint.CKPT_STAGING}.tmp-*"):
            try:  # the folder may be moved into checkpoints/ while it is looked at
                if any(d.iterdir()) and not (d / checkpoint.MANIFEST).exists():
                    found.append(d)
            except FileNotFoundError:
                continue
        return found

    while hit is None and proc.poll() is None and time.monotonic() < deadline:
        writing = half_written()
        if not writing:
            continue  # a tight loop: a checkpoint of this model is written in milliseconds
        os.killpg(proc.pid, signal.SIGSTOP)
        if writing[0] in half_written():
            hit = writing[0]
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGCONT)
    assert hit is not None, f"no checkpoint write was caught (exit {proc.poll()})"
    assert not (hit / checkpoint.MANIFEST).exists()  # the write was cut short
    proc.communicate(timeout=WAIT)
    assert proc.returncode == -signal.SIGKILL
    done = checkpoint.latest_step(out)
    assert 1 <= done < straight[1] and not (out / "final").exists()
    # What is on disk: whole checkpoints only (the cut write never reached checkpoints/).
    whole = sorted(p.name for p in ckpts.glob("checkpoint_local_*"))
    assert whole and all(checkpoint.verify(ckpts / n) is None for n in whole)
    assert json.loads((ckpts / whole[-1] / "step.json").read_text())["step"] == done
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # the rerun (in this process) checkpoints there too
    result = train.run(cfg, run)
    assert not result.skipped and steps(out)[-1] == straight[1]
    assert_equal_weights(straight[0], out / "final")
    assert not hit.exists() and not list(temp.iterdir())


# The driver of the Ray Train mid-write kill: `train.fit` with 2 workers in float64, joining this session's Ray.
FIT_DRIVER = """
import sys

import ray

from raydora import reference, train
from raydora.config import load_config

cfg = load_config(None, sys.argv[3:])
ray.init(address=sys.argv[1])
run_dir = cfg.run_dir
train.fit(
    mode="train", data_dir=run_dir / "reference", model_dir=reference.initial_policy(cfg, run_dir),
    out_dir=run_dir / sys.argv[2], run_cfg=cfg, train=cfg.train, options=train.WorkerOptions(master_dtype="float64"),
)
"""


@pytest.mark.slow  # ~60 s: two Ray Train worker groups (the first killed, the restarted one)
def test_a_ray_train_worker_killed_while_writing_a_checkpoint_restarts_from_the_one_before(
    run_dir: Path, address: str
) -> None:
    # As above, for a Ray Train worker (2 workers, a checkpoint every step): rank 0 writes each checkpoint into a
    # temp folder named with its pid, which Ray Train's report then copies into storage. When a write's folder holds
    # a file but no manifest, the test stops that worker (SIGSTOP) and, if the write is still unfinished, kills it.
    # Ray Train restarts the group (train.max_failures=1) from the newest checkpoint it holds, and the run ends
    # equal to an uninterrupted one (float64: 2 workers equal 1 process to 1e-9); the restarted rank 0
    # removes the dead worker's temp folder.
    common = [*BASE, "train.checkpoint_every=1", "train.max_failures=1", "train.max_steps=8"]
    args = [f"root={run_dir.parent}", f"name={run_dir.name}", *common]
    cfg = load_config(None, args)
    straight = train.fit(
        mode="train", data_dir=run_dir / "reference", model_dir=reference.initial_policy(cfg, run_dir),
        out_dir=run_dir / "straight64", run_cfg=cfg, train=cfg.train, options=train.WorkerOptions(master_dtype="float64"),
    )  # fmt: skip
    out = run_dir / "killed-mid-write"
    proc = subprocess.Popen([sys.executable, "-c", FIT_DRIVER, address, out.name, *args, "train.num_workers=2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    temp = Path(tempfile.gettempdir())  # the workers' too: they inherit this process's environment through Ray

    def half_written() -> list[tuple[Path, int]]:
        workers = set(our_workers("ray::RayTrainWorker"))
        found = []
        for d in temp.glob(f".{checkpoint.CKPT_STAGING}.tmp-*"):
            pid = rundir.staging_pid(d)
            try:  # the folder may be removed while it is looked at
                if pid in workers and any(d.iterdir()) and not (d / checkpoint.MANIFEST).exists():
                    found.append((d, pid))
            except FileNotFoundError:
                continue
        return found

    wait_for(proc, lambda: len(steps(out)) >= 2, "a first checkpoint")  # written before step 2 is logged
    hit: tuple[Path, int] | None = None
    cut = 0  # the step whose checkpoint is cut: rank 0 logs a step, then checkpoints it
    deadline = time.monotonic() + WAIT
    while hit is None and proc.poll() is None and time.monotonic() < deadline:
        writing = half_written()
        if not writing:
            continue
        folder, pid = writing[0]
        os.kill(pid, signal.SIGSTOP)
        if (folder, pid) in half_written():
            hit, cut = (folder, pid), len(steps(out))
            os.kill(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGCONT)
    assert hit is not None, f"no checkpoint write was caught (exit {proc.poll()})"
    text, _ = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, text[-4000:]
    # Ray Train restarted the group (a new rank 0) from the newest checkpoint its controller had registered: the step
    # before the cut write, or, when the controller had not yet polled that step's report (its poll is 0.2 s here;
    # more than half of 9 trial runs), an earlier one or none. Never the cut write: it never left the temp folder.
    assert json.loads((out / "workers" / "rank0.json").read_text())["pid"] != hit[1]
    resumed = [int(m) for m in re.findall(r"resumed at step (\d+) of", text)]
    assert all(r < cut for r in resumed), (cut, resumed)
    assert steps(out) == list(range(1, straight.counts["steps"] + 1))
    a, b = weights(run_dir / "straight64" / "final"), weights(out / "final")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-9, rtol=1e-7)
    assert not hit[0].exists()  # removed by the restarted rank 0's first checkpoint


# ---- item 2: the driver SIGKILLed mid-stage, then the stage rerun ---------------------------------------------------
UPSTREAM = {  # what each stage reads, copied (mtimes kept: the markers still match) into the run that is hit
    "validate": ("synth",),
    "reference": ("synth", "data", "quarantine", "tokenizer", "init"),
    "generate": ("synth", "data", "quarantine", "tokenizer", "init", "reference"),
    "train": ("synth", "data", "quarantine", "tokenizer", "init", "reference"),
    "classify": ("synth", "data", "quarantine", "tokenizer", "init"),
}
# The folders each stage writes (no heldout/: the benchmark brings its own eval split); the first holds the marker.
OUTPUT = {
    "validate": ("data", "quarantine"),
    "reference": ("reference",),
    "generate": ("generations/sft",),
    "classify": ("scored",),
}
STAGING = {  # classify: killed while it scores, its classifiers trained
    "validate": ".validate.tmp-*",
    "reference": ".reference.tmp-*",
    "generate": "generations/.sft.tmp-*",
    "classify": ".scored.tmp-*",
}


def upstream_copy(run_dir: Path, name: str, stage: str) -> Path:
    dest = run_dir.parent / name
    dest.mkdir()
    for folder in UPSTREAM[stage]:
        shutil.copytree(run_dir / folder, dest / folder)
    return dest


def rows(run: Path, out: str) -> list[dict]:
    """The rows of ``run/out`` in order; quarantine's input paths relative to the run."""
    got = pq.read_table(parquet_files(run / out)).to_pylist()
    return [{**r, "file": r["file"].replace(str(run), "<run>")} if "file" in r else r for r in got]


# reference, generate and classify (slow): each baseline is one more run of the stage, and their staging and promote
# are validate's (CI time, 2026-12-07).
@pytest.mark.parametrize(
    "stage",
    ["validate", *(pytest.param(s, marks=pytest.mark.slow) for s in ("reference", "generate", "classify"))],
)
def test_a_driver_killed_mid_stage_leaves_no_output_and_the_rerun_equals_an_uninterrupted_run(
    run_dir: Path, address: str, capsys: pytest.CaptureFixture[str], stage: str
) -> None:
    # `raydora pipeline --stages <stage>` is SIGKILLed (no cleanup runs) as soon as its staging folder exists, i.e.
    # mid-stage; Ray ends the job's workers and actors. The stage's output is then absent (never half there, never
    # with a _SUCCESS), the staging folder is left behind; the rerun removes it, redoes the stage and writes the
    # rows of an uninterrupted run, value for value and in order.
    baseline = run_dir
    make = {"validate": validate.run, "reference": reference.run, "generate": generate.run, "classify": classify.run}
    if stage in ("generate", "classify"):  # their uninterrupted outputs (samples of init/; classifiers and scores)
        baseline = upstream_copy(run_dir, f"{stage}-base", stage)
        make[stage](config(run_dir.parent, f"{stage}-base"), baseline)
    run_stage = make[stage]
    hit = upstream_copy(run_dir, f"kill-{stage}", stage)
    proc = raydora(hit, address, "pipeline", flags=("--stages", stage))
    wait_for(proc, lambda: any(hit.glob(STAGING[stage])), f"{stage}'s staging folder")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=WAIT) == -signal.SIGKILL
    left = list(hit.glob(STAGING[stage]))
    assert len(left) == 1
    for out in OUTPUT[stage]:
        assert not (hit / out / "_SUCCESS").exists(), out
    capsys.readouterr()
    result = run_stage(config(run_dir.parent, f"kill-{stage}"), hit)
    assert not result.skipped
    assert f"[rundir] removing {left[0]}: left by a process that was killed mid-stage" in capsys.readouterr().out
    assert not list(hit.glob(STAGING[stage])) and not left[0].exists()
    for out in OUTPUT[stage]:
        got, want = rows(hit, out), rows(baseline, out)
        assert got == want, out
        if "id" in got[0]:
            assert len({r["id"] for r in got}) == len(got), out  # no duplicate row
    assert (hit / OUTPUT[stage][0] / "_SUCCESS").exists()


# ---- item 3: an actor killed mid-stage ---------------------------------------------------------------------------
def our_workers(title: str) -> list[int]:
    """Pids of this session's Ray worker processes (children of its raylet, never another Ray's on this machine)
    whose process title starts with ``title``."""
    import ray._private.worker as ray_worker
    from ray._private import ray_constants

    raylet = ray_worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == raylet and cmd.startswith(title):
            found.append(int(proc.name))
    return found


# The title of a pool actor while it runs a batch (Ray sets it to the task's name), by stage.
BUSY = {
    "reference": "ray::MapWorker(MapBatches(ReferenceModel)).submit",
    "generate": "ray::MapWorker(MapBatches(HFGenerator)).submit",
    "classify": "ray::MapWorker(MapBatches(Scorer)).submit",
}


@pytest.mark.slow  # 60-90 s each on 2 cores (the actor restarts and reloads its model; classify trains first)
@pytest.mark.parametrize("stage", ["reference", "generate", "classify"])
def test_an_actor_killed_mid_stage_is_restarted_and_the_rows_are_identical(
    run_dir: Path, address: str, stage: str
) -> None:
    # SIGKILL of one of the stage's pool actors while it runs a batch: the reference pass's model, a generator, a
    # classifier scorer. Ray Data restarts the actor and retries the batch (its actor pools default to
    # max_restarts=-1, max_task_retries=-1), and the stage writes exactly the rows of the uninterrupted run.
    baseline = run_dir
    if stage in ("generate", "classify"):  # their uninterrupted outputs (samples of init/; classifiers and scores)
        baseline = upstream_copy(run_dir, f"{stage}-actor-base", stage)
        {"generate": generate.run, "classify": classify.run}[stage](
            config(run_dir.parent, f"{stage}-actor-base"), baseline
        )
    hit = upstream_copy(run_dir, f"kill-{stage}-actor", stage)
    proc = raydora(hit, address, "pipeline", flags=("--stages", stage))
    wait_for(proc, lambda: bool(our_workers(BUSY[stage])), f"a {stage} actor running a batch")
    victim = our_workers(BUSY[stage])[0]
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code == 0, err[-3000:]
    assert victim not in our_workers("ray::")
    for out in OUTPUT[stage]:
        assert rows(hit, out) == rows(baseline, out), out


# ---- item 6: disk full -------------------------------------------------------------------------------------------
def test_a_full_disk_fails_the_stage_naming_it_and_leaves_nothing_then_a_rerun_with_space_succeeds(
    run_dir: Path, tmp_path: Path
) -> None:
    # The run root is a size-limited tmpfs holding the stage's input: validate runs out of space mid-write.
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        hit = root / "run"
        hit.mkdir()
        shutil.copytree(run_dir / "synth", hit / "synth")
        used = shutil.disk_usage(root).used
        # Room for the input and 16 KiB more: the outputs (~45 KB of parquet and tokenizer) do not fit.
        subprocess.run(["mount", "-o", f"remount,size={used + (16 << 10)}", str(root)], check=True)
        cfg = config(root, "run")
        with pytest.raises(rundir.DiskFullError) as failed:
            validate.run(cfg, hit)
        msg = str(failed.value)
        assert msg.startswith(f"[Errno 28] no space left on device while writing 'validate' under {hit} (staged in")
        assert msg.endswith("nothing was promoted, no _SUCCESS written); free space on that filesystem and rerun")
        assert sorted(p.name for p in hit.iterdir()) == ["synth"]  # no half output, no staging folder, no marker
        subprocess.run(["mount", "-o", "remount,size=8m", str(root)], check=True)
        validate.run(cfg, hit)
        for out in OUTPUT["validate"]:
            assert rows(hit, out) == rows(run_dir, out), out
    finally:
        subprocess.run(["umount", str(root)], check=False)
