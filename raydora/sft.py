"""The ``sft`` stage: an NLL warm start of ``model.policy`` on the SFT corpus (the benchmark's ``synth/sft``, or
the best response of each validated row), trained by the same Ray Train recipe as preference optimisation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raydora.config import RunConfig, TrainConfig
from raydora.rundir import StageResult, file_fingerprints, fingerprint, is_done, read_success, write_success
from raydora.train import WorkerOptions, fit

# The TrainConfig keys the SFT loop reads (the rest are preference-only and must not invalidate a finished SFT).
SFT_TRAIN_KEYS = (
    "use_gpu",
    "placement_strategy",
    "weight_decay",
    "warmup_ratio",
    "scheduler",
    "grad_clip",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "strategy",
    "shuffle_block_rows",
    "log_every",
    "nan_policy",
)


def _sft_rows_from_synth(batch: dict[str, Any]) -> dict[str, Any]:
    n = len(batch["prompt"])
    return {
        "prompt": batch["prompt"],
        "responses": [[r] for r in batch["response"]],
        "scores": [[1.0]] * n,
        "sources": [[s] for s in batch["source"]],
    }


def _sft_rows_from_preferences(batch: pa.Table) -> pa.Table:
    """The best-scored response of each preference row, as a one-response row."""
    columns = ["prompt", "responses", "scores", "sources"]
    rows = batch.select(columns + [c for c in ("prompt_messages",) if c in batch.schema.names]).to_pylist()
    best = [int(np.argmax(r["scores"])) for r in rows]
    return pa.table(
        {
            "prompt": [r["prompt"] for r in rows],
            "responses": [[r["responses"][b]] for r, b in zip(rows, best, strict=True)],
            "scores": [[1.0] for _ in rows],
            "sources": [[r["sources"][b]] for r, b in zip(rows, best, strict=True)],
            "prompt_messages": pa.array([r.get("prompt_messages") for r in rows], pa.string()),
        }
    )


def sft_corpus(cfg: Any, run_dir: Path) -> Path:
    """Tokenised SFT rows in ``sft_data/``: the benchmark's ``synth/sft`` corpus, else the best response of each
    row of ``data/``. Same tokenisation as preference training (``encoding.encode``)."""
    import ray.data

    from raydora.data import IO_CPUS, read_canonical, write_rows
    from raydora.reference import encode_rows, tokenizer_dir
    from raydora.rundir import promote, staging

    synth = run_dir / "synth" / "sft"
    source = synth if any(synth.glob("*.json")) else run_dir / "data"
    upstream = read_success(synth.parent if source == synth else source) or {}
    if not upstream:
        raise FileNotFoundError(f"{source}: no SFT corpus (run synth, or validate your data first)")
    tok = tokenizer_dir(cfg, run_dir)
    fp = fingerprint(
        "sft_data",
        upstream.get("fingerprint"),
        file_fingerprints(tok),
        cfg.model.max_length,
        *([f"prompt<={cfg.model.max_prompt_length}"] if cfg.model.max_prompt_length else []),
    )
    out = run_dir / "sft_data"
    if is_done(out, fp):
        return out
    with staging(run_dir, "sft_corpus") as tmp:
        if source == synth:
            files = [str(f) for f in sorted(synth.glob("*.json"))]
            ds = ray.data.read_json(files, num_cpus=IO_CPUS).map_batches(
                _sft_rows_from_synth, batch_format="numpy", num_cpus=IO_CPUS
            )
        else:
            ds = read_canonical(source, num_cpus=IO_CPUS).map_batches(
                _sft_rows_from_preferences, batch_format="pyarrow", num_cpus=IO_CPUS
            )
        write_rows(ds, tmp / "rows")
        write_success(tmp / "rows", {"stage": "sft_corpus", "fingerprint": fp})
        encode_rows(
            tmp / "rows",
            tmp / "encoded",
            model_dir=None,
            tokenizer=tok,
            max_length=cfg.model.max_length,
            cfg=cfg.reference,
            stage="sft_data",
            fp=fp,
            max_prompt_length=cfg.model.max_prompt_length,
        )
        promote(tmp / "encoded", out)
    return out


def train_section(cfg: RunConfig) -> tuple[TrainConfig, dict[str, Any]]:
    """The train section SFT's workers read, and what of it decides the result (the stage's fingerprint)."""
    # What decides the result: the shared train keys SFT reads, and the fixed full-weight NLL setup.
    fixed = {"objective": "erm", "lora_r": 0, "lora_alpha": 16.0, "max_steps": 0}
    identity = {**{k: getattr(cfg.train, k) for k in SFT_TRAIN_KEYS}, **fixed, "loss": "sft"}
    if cfg.sft.checkpoint_every is not None:
        identity["checkpoint_every"] = cfg.sft.checkpoint_every
    # The section as the workers read it (mode "sft" makes the loss the NLL of the response): the keys above,
    # padded batches, the run's SIGTERM behaviour (in no fingerprint), and defaults for the preference-only keys,
    # so a change to those cannot reach SFT.
    keep = {k: identity[k] for k in (*SFT_TRAIN_KEYS, *fixed)}
    keep["preemption_checkpoint"] = cfg.train.preemption_checkpoint
    return dataclasses.replace(TrainConfig(), packing=False, **keep), identity


def run(
    cfg: RunConfig, run_dir: str | Path, *, force: bool = False, options: WorkerOptions | None = None
) -> StageResult:
    """Pipeline stage ``sft``: NLL warm start of ``model.policy`` on the SFT corpus into ``sft/final``."""
    from raydora.reference import base_policy

    run_dir = Path(run_dir).absolute()
    if not cfg.sft.enabled:
        return StageResult("sft", {}, {}, skipped=True, info={"reason": "sft.enabled=false"})
    data = sft_corpus(cfg, run_dir)
    train, identity = train_section(cfg)
    return fit(
        mode="sft",
        data_dir=data,
        model_dir=base_policy(cfg, run_dir),
        out_dir=run_dir / "sft",
        run_cfg=cfg,
        train=train,
        shape=cfg.sft,
        identity=identity,
        options=options,
        force=force,
    )
