"""The training recipe on Ray Train: one ``train_loop_per_worker`` for the SFT warm start and for robust
preference training, on 1..N workers, with exact global-batch robust objectives (see ``docs/training.md``).

The recipe only orchestrates: the data plan (which rows form each step, one ordered dataset per worker) is
:mod:`raydora.plan`, one optimizer step (collation, per-sample losses, the objective over the global batch) is
:mod:`raydora.step`, and saving, resuming and merging LoRA weights is :mod:`raydora.checkpoint`. The worker gets a
frozen :class:`WorkerSpec` built by :func:`fit` from the typed :class:`~raydora.config.RunConfig`. Each step AdamW
steps with a warmup + cosine (or linear / constant) schedule; a NaN or infinite loss stops the run
(``train.nan_policy=raise``) or skips the batch (``skip``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq

from raydora.checkpoint import (
    Preempted,
    drain_notice,
    keep_local_checkpoint,
    latest_checkpoint,
    load_policy,
    pick_resume,
    preemption,
    restore,
    save_checkpoint,
    save_model,
)
from raydora.cluster import check_gpus, fit_or_explain, placement_retries
from raydora.config import P_GOLDEN_OBJECTIVES, RunConfig, TrainConfig
from raydora.plan import make_plan, worker_datasets
from raydora.rundir import StageResult, file_fingerprints, fingerprint, is_done, read_success, write_success
from raydora.step import DoraInfo, StepConfig, collate_micro, packing_supported, train_step
from raydora.tracking import METRICS_FILE, STATE_FILE

FAILED_FILE = "_FAILED"
PREEMPTED_FILE = "_PREEMPTED"  # the loop stopped on SIGTERM after checkpointing a step: what it says, for the driver
# Left out of the ``_SUCCESS`` manifest of train/ and sft/: Ray Train manages (and prunes) checkpoints/, and the
# logs and diagnostics may be deleted without invalidating final/ (which, with the metrics, is in the manifest).
UNTRACKED = ("checkpoints", "tensorboard", "workers", "wandb", STATE_FILE)

# Called on every worker before each optimizer step's forward, with the 1-based step, the rank, the world size and
# the step's collated micro-batches (which it may modify). Tests inject faults through it (``tests/faults.py``);
# the production loop has no fault code of its own. Callbacks travel to the workers by pickle: module-level.
StepCallback = Callable[[int, int, int, list[dict[str, Any]]], None]


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss or gradient stopped training (``train.nan_policy=raise``)."""


class RunShape(Protocol):
    """The sizes of a training run, as ``TrainConfig`` and ``SFTConfig`` both declare them."""

    @property
    def batch_size(self) -> int: ...
    @property
    def micro_batch_size(self) -> int: ...
    @property
    def num_workers(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    @property
    def lr(self) -> float: ...


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """How the workers run, not what they compute (none of it is in the stage's fingerprint)."""

    threads: int | None = None
    """torch threads per worker; None: 1 on CPU (a worker holds one core), the torch default on GPU."""
    worker_cpus: float = 1
    """CPUs Ray reserves per training worker."""
    master_dtype: str = "float32"
    """The trainable parameters' dtype (tests compare 1 and 2 workers in float64)."""
    callbacks: tuple[StepCallback, ...] = ()
    """:data:`StepCallback` hooks, run on every worker before every step."""


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """Everything a training worker reads, built on the driver by :func:`fit`."""

    step: StepConfig
    model_dir: str
    out_dir: str
    seed: int
    precision: str
    attn_implementation: str
    pad_to_multiple_of: int
    lr: float
    total_steps: int
    steps_per_epoch: int
    run_name: str
    resume_from: str | None = None
    resume_step: int = 0  # the step of resume_from: the data plan starts there
    threads: int = 1
    master_dtype: str = "float32"
    tracking: dict[str, Any] | None = None
    params: dict[str, Any] | None = None
    dora: DoraInfo | None = None
    callbacks: tuple[StepCallback, ...] = ()
    in_process: bool = False  # num_workers=0: the loop runs in the driver and keeps its own checkpoints

    @property
    def train(self) -> TrainConfig:
        return self.step.train

    @property
    def mode(self) -> str:
        return self.step.mode


# ---- the worker loop ---------------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int, kind: str) -> Any:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def make_optimizer(params: list[Any], lr: float, weight_decay: float, sharded: bool = False) -> Any:
    """AdamW; the fused kernel (one pass over every parameter, CPU and CUDA) unless FSDP shards the parameters,
    where torch picks its multi-tensor path."""
    import torch

    if sharded:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """Ray Train worker: SFT (``spec.mode == "sft"``) or robust preference optimisation of ``config["spec"]``.
    With ``spec.in_process`` (``num_workers=0``) it runs in the driver on ``config["datasets"]`` and calls no
    ``ray.train`` function (no Ray Train context exists; inside a Ray Tune trial those calls would raise)."""
    import ray.train
    import torch
    import transformers

    from raydora import distributed
    from raydora.hardware import resolve_precision
    from raydora.models import load_tokenizer
    from raydora.tracking import Tracker

    spec: WorkerSpec = config["spec"]
    stop: threading.Event | None = config.get("stop")  # set by SIGTERM (in this process only: :func:`preemption`)
    transformers.utils.logging.disable_progress_bar()
    t, out_dir = spec.train, Path(spec.out_dir)
    local = spec.in_process
    ctx = {"rank": 0, "local_rank": 0, "world_size": 1} if local else distributed.train_context()
    rank, world = ctx["rank"], ctx["world_size"]
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    device = torch.device(f"cuda:{ctx['local_rank']}" if t.use_gpu else "cpu")
    if t.use_gpu:
        torch.cuda.set_device(device)
    _record_worker(out_dir, rank, world, device)
    amp = resolve_precision(spec.precision, device.type)
    if spec.step.wdpo and t.wdpo_grad == "finite_difference" and amp != torch.float32:
        # A difference of two gradients at a 1e-3 relative move: bf16 activations would round it away.
        raise ValueError(f"train.wdpo_grad=finite_difference needs fp32 (model.precision resolved to {amp})")
    master = getattr(torch, spec.master_dtype)
    tokenizer = load_tokenizer(spec.model_dir)
    model = load_policy(spec.model_dir, amp, master, spec.attn_implementation, t.lora_r, t.lora_alpha)
    model.to(device).train()
    fsdp = t.strategy == "fsdp" and world > 1
    if fsdp:
        model = distributed.shard_fsdp(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, spec.lr, t.weight_decay, sharded=fsdp)
    total = spec.total_steps
    warmup = round(t.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, t.scheduler))

    start = 0
    # After a worker failure Ray Train hands back the group's latest checkpoint; a rerun of an interrupted stage
    # resumes from the newest whole one the driver found on storage (checkpoint.pick_resume).
    ckpt = None if local else ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        ray_dir = Path(stack.enter_context(ckpt.as_directory())) if ckpt is not None else None
        chosen = pick_resume(ray_dir, spec.resume_from, spec.resume_step)
        if chosen is not None:
            start = restore(chosen, model, optimizer, scheduler)
            if rank == 0:
                print(f"[{spec.mode}] resumed at step {start} of {spec.total_steps} from {chosen}", flush=True)
    group = distributed.default_group() if world > 1 else None
    tracker = None  # rank 0: metrics.jsonl, TensorBoard, and MLflow / W&B when the logging section asks
    if rank == 0:
        tracker = Tracker(out_dir, start, spec.tracking, spec.params, spec.run_name)
    rows_per_step = spec.step.batch_size // world
    mbs = spec.step.micro_batch_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    shard = config["datasets"][f"train_{rank}"] if local else ray.train.get_dataset_shard(f"train_{rank}")
    skipped, last_metrics, step = 0, {}, start
    # Ray 2.5x+ tells the workers of a drain for preemption; every rank asks after every step (a collective).
    watch_preemption = not local and t.preemption_checkpoint and hasattr(ray.train, "get_preemption_info")
    pack: bool | None = None

    def save(step: int, m: dict[str, Any]) -> Path | None:
        """Checkpoint ``step``: kept under ``checkpoints/`` here (in this process), else reported to Ray Train."""
        path = save_checkpoint(model, optimizer, scheduler, tokenizer, step, lora=bool(t.lora_r), rank=rank)
        if local:  # no Ray Train to keep it: where Ray Train would
            return keep_local_checkpoint(Path(path or ""), out_dir, step, t.keep_checkpoints)
        checkpoint = ray.train.Checkpoint.from_directory(path) if path else None
        ray.train.report(m, checkpoint=checkpoint)
        if path:
            shutil.rmtree(path, ignore_errors=True)
        return None

    tic = time.perf_counter()
    for rows in shard.iter_batches(batch_size=rows_per_step, batch_format="numpy", prefetch_batches=2):
        steps = np.unique(rows["_step"])
        if len(steps) != 1 or len(rows["_step"]) != rows_per_step:
            raise RuntimeError(f"worker {rank}: a batch spans steps {steps.tolist()} ({len(rows['_step'])} rows)")
        if int(steps[0]) < start:
            continue
        if int(steps[0]) != step:
            raise RuntimeError(f"worker {rank}: expected the rows of step {step}, got step {int(steps[0])}")
        if pack is None:  # decided once, on the first batch
            pack = t.packing and packing_supported(model, rows, spec.step, pad, device, rank)
        micro = [
            collate_micro(rows, slice(i, i + mbs), spec.mode, t.loss, pad, spec.dora, pack, spec.pad_to_multiple_of)
            for i in range(0, rows_per_step, mbs)
        ]
        for mb in micro:
            mb["enc"] = {k: v.to(device) for k, v in mb["enc"].items()}
        for callback in spec.callbacks:
            callback(step + 1, rank, world, micro)
        stats = train_step(model, micro, spec.step, group=group, world=world, device=device, amp=amp, fsdp=fsdp)
        finite = bool(torch.isfinite(stats["value"])) and math.isfinite(stats["grad_norm_pre"])
        if not finite:
            msg = (
                f"non-finite {'loss' if not torch.isfinite(stats['value']) else 'gradient'} at step {step + 1} "
                f"(loss={float(stats['value'])}, grad norm={stats['grad_norm_pre']})"
            )
            if t.nan_policy == "raise":
                if rank == 0:
                    (out_dir / FAILED_FILE).write_text(msg + "\n")
                if not local:
                    ray.train.report({"step": step + 1, "failed": msg})
                if tracker is not None:
                    tracker.close(failed=True)
                return
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        toc = time.perf_counter()
        m = {
            "step": step,
            "epoch": (step - 1) // spec.steps_per_epoch,
            "lr": scheduler.get_last_lr()[0],
            "skipped_batches": skipped,
            "pairs_per_s": spec.step.batch_size / (toc - tic),
            "tokens_per_s": stats["tokens"] / (toc - tic),
            **stats["metrics"],
        }
        tic = toc
        last_metrics = m
        if tracker is not None:
            tracker.log(m, step)
            if step % t.log_every == 0 or step == total:
                print(
                    f"[{spec.mode}] step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                    f"grad {m['grad_norm']:.3f} {m['pairs_per_s']:.1f} rows/s",
                    flush=True,
                )
        saved = None
        periodic = step % t.checkpoint_every == 0 or step == total
        if periodic:
            saved = save(step, m)
        if watch_preemption and step < total and drain_notice(spec.mode, step, rank):
            # A node of the group is draining for preemption (a pod's SIGTERM to its `ray start`, or the autoscaler):
            # keep this step, then train on until Ray Train restarts the group from it (docs/training.md).
            watch_preemption = False
            if not periodic:
                save(step, m)
        if stop is not None and stop.is_set() and step < total:  # SIGTERM: this step is whole; keep it and stop
            saved = saved or save(step, m)
            msg = f"stopped by SIGTERM after step {step} of {total}; checkpoint {saved}"
            print(f"[{spec.mode}] {msg}", flush=True)
            (out_dir / PREEMPTED_FILE).write_text(msg + "\n")
            if tracker is not None:
                tracker.close()
            return
    if tracker is not None:
        tracker.close()
    state = distributed.full_state_dict(model)
    if rank == 0:
        save_model(model, tokenizer, out_dir / "final", state)
        (out_dir / "final_metrics.json").write_text(json.dumps({**last_metrics, "steps": step}))
    distributed.barrier()


def _record_worker(out_dir: Path, rank: int, world: int, device: Any) -> None:
    """``workers/rank<r>.json``: the node, host and process each rank ran on (multi-node runs are checked with it)."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    info = {
        "rank": rank,
        "world_size": world,
        "node_id": ctx.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(device),
    }
    folder = out_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(info) + "\n")


# ---- driver --------------------------------------------------------------------------------------------------------
def build_trainer(
    spec: WorkerSpec,
    datasets: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    out_dir: Path,
    max_failures: int,
    worker_cpus: float = 1,
    keep_checkpoints: int | None = None,
    placement_strategy: str = "PACK",
) -> Any:
    """The ``TorchTrainer``: ``num_workers`` workers (gloo on CPU, NCCL on GPU) running
    :func:`train_loop_per_worker`, one ordered dataset each, checkpoints under ``out_dir/checkpoints`` and
    ``max_failures`` automatic restarts from the latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydora.data import ordered_ingest

    # Ray Train v2 retries a worker group that it could not place within its start timeout
    # (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s) without end by default; bounded like the workers' own
    # failures, a lost node that never comes back stops the run (cluster.WorkersNotPlacedError), except in a Tune
    # trial, whose trainers queue for resources. v1 has no such limit.
    limits: dict[str, Any] = {"max_failures": max_failures}
    if "controller_failure_limit" in {f.name for f in dataclasses.fields(FailureConfig)}:
        limits["controller_failure_limit"] = placement_retries(max_failures)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": worker_cpus},
            placement_strategy=placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        # Every worker reads its own ordered dataset: Train must neither split nor reorder them.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ordered_ingest()),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(out_dir),
            failure_config=FailureConfig(**limits),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


# Keys that change where or how often things happen, not the trained weights: a rerun with new values resumes.
# accumulation, fsdp_grad_sync: the online softmax and the window pass, and FSDP reducing every micro-batch or once
# a step, compute the same gradient (to rounding).
NOT_IN_FINGERPRINT = (
    "placement_strategy",
    "keep_checkpoints",
    "log_every",
    "max_failures",
    "accumulation",
    "fsdp_grad_sync",
    "preemption_checkpoint",
)


def fit(
    *,
    mode: str,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    run_cfg: Any,
    train: TrainConfig,
    shape: RunShape | None = None,
    identity: Mapping[str, Any] | None = None,
    options: WorkerOptions | None = None,
    force: bool = False,
) -> StageResult:
    """Train ``model_dir`` on ``data_dir`` into ``out_dir`` (``checkpoints/``, ``metrics.jsonl``, ``final/``).

    ``mode``: ``train`` (preference optimisation) or ``sft``. ``train`` is the section the workers read.
    ``shape``: the batch size, micro-batch size, workers, epochs and learning rate (default: ``train``'s own; SFT
    passes its ``sft`` section). ``identity``: what of ``train`` decides the result, the stage's fingerprint
    (default: every key but :data:`NOT_IN_FINGERPRINT`). A finished run with the same fingerprint is skipped; an
    interrupted one resumes from its newest checkpoint."""
    from raydora import tracking
    from raydora.config import to_dict
    from raydora.data import in_this_process, parquet_files
    from raydora.reference import attn_implementation

    options = options or WorkerOptions()
    shape = shape or train
    batch_size, micro_batch_size, num_workers = shape.batch_size, shape.micro_batch_size, shape.num_workers
    world = max(1, num_workers)  # 0: the training loop in this process (as Ray Train's local mode)
    epochs, lr = shape.epochs, shape.lr
    tracked = tracking.settings(getattr(run_cfg, "logging", None))  # fails here when a backend is not installed
    out_dir = Path(out_dir).absolute()
    if identity is None:
        identity = {k: v for k, v in dataclasses.asdict(train).items() if k not in NOT_IN_FINGERPRINT}
    fp = fingerprint(
        mode,
        (read_success(data_dir) or {}).get("fingerprint"),
        file_fingerprints(model_dir),
        dict(identity),
        batch_size,
        micro_batch_size,
        num_workers,
        epochs,
        lr,
        run_cfg.seed,
        run_cfg.model.precision,
    )
    if not force and is_done(out_dir, fp, on_corrupt=shutil.rmtree):  # corrupted: a fresh run, nothing resumed
        done = read_success(out_dir) or {}
        return StageResult(mode, {"final": str(out_dir / "final")}, done.get("rows", {}), skipped=True)
    marker = out_dir / "fingerprint.json"
    if out_dir.exists() and (force or not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != fp):
        shutil.rmtree(out_dir)  # another config's checkpoints must not be resumed
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp}))
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    (out_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    start, resume = latest_checkpoint(out_dir, say=True)
    plan = make_plan(
        data_dir,
        batch_size=batch_size,
        world=world,
        epochs=epochs,
        seed=run_cfg.seed,
        block_rows=train.shuffle_block_rows,
        max_steps=train.max_steps if mode == "train" else 0,
        start_step=start,
    )
    columns = ["prompt_ids", "response_ids"]
    schema = pq.read_schema(parquet_files(data_dir)[0])
    columns += [c for c in ("scores", "sources", "reference_logps", "p_golden") if c in schema.names]
    dora = None
    if mode != "sft" and train.objective in P_GOLDEN_OBJECTIVES:
        dora = dora_info(run_cfg, data_dir)
        if "p_golden" not in columns:
            raise ValueError(
                f"train.objective={train.objective} needs p_golden: run the classify stage before reference"
            )
    spec = WorkerSpec(
        step=StepConfig(
            "sft" if mode == "sft" else "preference", train, batch_size, micro_batch_size, run_cfg.model.logprob_chunk
        ),
        model_dir=str(Path(model_dir).absolute()),
        out_dir=str(out_dir),
        seed=run_cfg.seed,
        precision=run_cfg.model.precision,
        attn_implementation=attn_implementation(run_cfg),
        pad_to_multiple_of=run_cfg.model.pad_to_multiple_of,
        lr=lr,
        total_steps=plan.total_steps,
        steps_per_epoch=plan.steps_per_epoch,
        run_name=f"{run_cfg.name}/{mode}",
        resume_from=str(resume) if resume else None,
        resume_step=start,
        # A worker holds one CPU (worker_cpus); in this process (num_workers=0) torch's threads stay as they are.
        threads=options.threads if options.threads is not None else (0 if train.use_gpu or not num_workers else 1),
        master_dtype=options.master_dtype,
        tracking=tracked,
        params=to_dict(run_cfg) if tracked else None,
        dora=dora,
        callbacks=options.callbacks,
        in_process=num_workers == 0,
    )
    if train.use_gpu:  # Ray Train would wait forever for GPUs the cluster lacks
        check_gpus(world, 1, "sft.num_workers" if mode == "sft" else "train.num_workers")
    datasets = worker_datasets(plan, seed=run_cfg.seed, columns=columns, start_step=start)
    if num_workers == 0:
        # In this process: Ray Train's local mode would do the same, but its ray.train calls raise inside a Ray
        # Tune trial. The loop sets this process's torch threads when spec.threads asks.
        with in_this_process(datasets.values()), preemption(train.preemption_checkpoint) as stop:
            train_loop_per_worker({"spec": spec, "datasets": datasets, "stop": stop})
    else:
        trainer = build_trainer(
            spec,
            datasets,
            num_workers=num_workers,
            use_gpu=train.use_gpu,
            out_dir=out_dir,
            max_failures=train.max_failures,
            worker_cpus=options.worker_cpus,
            keep_checkpoints=train.keep_checkpoints,
            placement_strategy=train.placement_strategy,
        )
        fit_or_explain(trainer, mode, out_dir, num_workers, train.placement_strategy, train.max_failures)
    preempted = out_dir / PREEMPTED_FILE
    if preempted.exists():
        msg = f"{mode}: {preempted.read_text().strip()}; run the same command again to resume from it"
        print(f"raydora {msg}", file=sys.stderr, flush=True)
        raise Preempted(msg)
    failed = out_dir / FAILED_FILE
    if failed.exists():
        raise NonFiniteLossError(
            f"{mode}: {failed.read_text().strip()}; set train.nan_policy=skip to skip such batches"
        )
    final = json.loads((out_dir / "final_metrics.json").read_text())
    counts = {"rows": plan.rows, "steps": plan.total_steps}
    write_success(out_dir, {"stage": mode, "fingerprint": fp, "rows": counts, "metrics": final}, exclude=UNTRACKED)
    return StageResult(
        mode, {"final": str(out_dir / "final"), "metrics": str(out_dir / METRICS_FILE)}, counts, info=final
    )


def dora_info(cfg: Any, data_dir: Path) -> DoraInfo:
    """The DoRA constants: source shares (the classify stage's ``scored/_SUCCESS``) and imbalance ratios (the
    classifiers' calibration)."""
    run_dir = cfg.run_dir.absolute()
    scored = read_success(run_dir / "scored") or {}
    shares = dict(scored.get("shares") or {})
    gammas = {}
    for s in shares:
        cal = run_dir / "classifier" / s / "calibration.json"
        gammas[s] = json.loads(cal.read_text()).get("gamma", 1.0) if cal.exists() else 1.0
    if not shares:
        raise ValueError(f"{run_dir / 'scored'}: no source shares recorded; run the classify stage")
    return {"shares": shares, "gammas": gammas, "alpha": cfg.train.dora_alpha, "form": scored.get("form", "per_source")}


def run(
    cfg: RunConfig, run_dir: str | Path, *, force: bool = False, options: WorkerOptions | None = None
) -> StageResult:
    """Pipeline stage ``train``: robust preference optimisation on ``reference/`` into ``train/``."""
    from raydora.reference import initial_policy

    run_dir = Path(run_dir).absolute()
    ref = run_dir / "reference"
    if read_success(ref) is None:
        raise FileNotFoundError(f"{ref}: no reference log-probs (_SUCCESS missing); run the reference stage first")
    return fit(
        mode="train",
        data_dir=ref,
        model_dir=initial_policy(cfg, run_dir),
        out_dir=run_dir / "train",
        run_cfg=cfg,
        train=cfg.train,
        options=options,
        force=force,
    )
