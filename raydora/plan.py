"""The data plan of a training run: which rows form each optimizer step, and one ordered Ray Dataset per worker.

**Data order is part of the math.** A robust objective depends on which rows share an optimizer step, so the
global batch of step ``s`` must not depend on the number of workers. Each epoch permutes the rows
deterministically (shuffle blocks of ``shuffle_block_rows`` rows, then the rows inside each block, both seeded by
``seed`` and the epoch); step ``s`` takes the next ``batch_size`` rows and worker ``r`` of ``W`` takes the ``r``-th
contiguous ``batch_size / W`` of them. Every worker gets its own Ray Dataset (``train_<rank>``, read with
``preserve_order``) holding exactly its rows, so 2 workers x batch b see the same global batches as 1 worker x
batch 2b, and a resumed run sees the same batches as an uninterrupted one. The last ``N mod batch_size`` rows of
an epoch are dropped (a different set each epoch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


@dataclasses.dataclass(frozen=True)
class Plan:
    """The deterministic order of one training run: which rows form each step, for every epoch."""

    entries: list[dict[str, Any]]  # one per shuffle block and epoch, in stream order
    rows: int
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    world: int


def make_plan(
    data_dir: str | Path,
    *,
    batch_size: int,
    world: int,
    epochs: int,
    seed: int,
    block_rows: int,
    max_steps: int = 0,
    start_step: int = 0,
) -> Plan:
    """Plan every epoch's permuted shuffle blocks (reading nothing but parquet footers). Blocks holding only
    steps before ``start_step`` are left out, so a resumed run does not reread them."""
    from raydora.data import parquet_files

    files = parquet_files(data_dir)
    blocks = []
    for path in files:
        n = pq.ParquetFile(path).metadata.num_rows
        blocks += [(str(path), a, min(a + block_rows, n)) for a in range(0, n, block_rows)]
    rows = sum(b[2] - b[1] for b in blocks)
    per_epoch = rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{data_dir}: {rows} rows make no full step of batch_size={batch_size}")
    total = per_epoch * epochs if not max_steps else min(max_steps, per_epoch * epochs)
    entries = []
    for epoch in range(math.ceil(total / per_epoch)):
        pos = 0
        for j in np.random.default_rng([seed, epoch]).permutation(len(blocks)):
            f, a, b = blocks[int(j)]
            first, last = epoch * per_epoch + pos // batch_size, epoch * per_epoch + (pos + b - a - 1) // batch_size
            if last >= start_step and first < total:
                entries.append({"file": f, "start": a, "stop": b, "epoch": epoch, "pos": pos, "block": int(j)})
            pos += b - a
    return Plan(entries, rows, per_epoch, total, batch_size, world)


def _read_rows(file: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    from raydora.data import row_groups

    pf = pq.ParquetFile(file)
    groups, first = row_groups(pf, start, stop)
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _read_planned(
    batch: dict[str, Any], *, rank: int, plan: dict[str, int], seed: int, columns: list[str]
) -> Iterator[pa.Table]:
    """Ray Data UDF: the rows of this worker in some shuffle blocks, in step order, with a ``_step`` column."""
    b, world, per_epoch = plan["batch_size"], plan["world"], plan["steps_per_epoch"]
    local = b // world
    for f, a, z, epoch, pos, block in zip(
        batch["file"], batch["start"], batch["stop"], batch["epoch"], batch["pos"], batch["block"], strict=True
    ):
        table = _read_rows(str(f), int(a), int(z), columns)
        perm = np.random.default_rng([seed, int(epoch), int(block)]).permutation(table.num_rows)
        table = table.take(pa.array(perm))
        p = int(pos) + np.arange(table.num_rows)
        step = int(epoch) * per_epoch + p // b
        keep = (
            (p < per_epoch * b)
            & ((p % b) // local == rank)
            & (step >= plan["start_step"])
            & (step < plan["total_steps"])
        )
        if keep.any():
            yield table.filter(pa.array(keep)).append_column("_step", pa.array(step[keep], pa.int64()))


def worker_datasets(plan: Plan, *, seed: int, columns: list[str], start_step: int = 0) -> dict[str, Any]:
    """One ordered Ray Dataset per worker: ``train_<rank>`` holds that worker's rows of every step in order."""
    import ray.data

    info = {
        "batch_size": plan.batch_size,
        "world": plan.world,
        "steps_per_epoch": plan.steps_per_epoch,
        "total_steps": plan.total_steps,
        "start_step": start_step,
    }
    out: dict[str, Any] = {}
    per_task = max(1, 1024 // max(1, plan.entries[0]["stop"] - plan.entries[0]["start"])) if plan.entries else 1
    for r in range(plan.world):
        items = plan.entries or [{"file": "", "start": 0, "stop": 0, "epoch": 0, "pos": 0, "block": 0}]
        ds: Any = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_task)))
        if not plan.entries:
            ds = ds.limit(0)
        # num_cpus=0: the trainers hold the cores; reading token ids is light and must never wait for them.
        # One task at a time: a 0-CPU task is not bounded by the cores, and Ray Data otherwise ran a dozen at once,
        # each in a fresh worker process (~120 MB), which then lingered idle: 4 GB of the demo's peak memory.
        ds = ds.map_batches(
            _read_planned,
            batch_size=per_task,
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=1),  # `concurrency=1`, which Ray 2.51+ deprecates
            fn_kwargs={"rank": r, "plan": info, "seed": seed, "columns": columns},
        )
        ds.context.enable_progress_bars = False  # N workers x bars would bury the step lines
        out[f"train_{r}"] = ds
    return out
