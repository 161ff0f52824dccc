"""The Ray Data and parquet helpers every stage shares: the canonical row schema, streaming reads of a stage
folder (:func:`read_canonical`), ordered parquet writes (:func:`write_rows`, :class:`OrderedParquetSink`) and the
map of a callable class over a stage's rows (:func:`map_rows`: an actor pool, or this process). Input files are
read in :mod:`raydora.inputs`, and validated by the validate stage (:mod:`raydora.validate`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 2048  # rows per Arrow block a read task yields: bounds a task's memory

# The canonical rows of data/: one row per prompt with its responses, scores and sources (``schema``: the rules).
CANONICAL_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("responses", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float64())),
        ("sources", pa.list_(pa.string())),
        ("split", pa.string()),
        ("meta", pa.string()),
        ("prompt_messages", pa.string()),  # a conversational prompt's turns (JSON), rendered by the policy's template
    ]
)


IO_CPUS = 0.25  # CPU slots a parquet read / write task claims next to an actor pool that holds the cores


def parquet_files(path: str | Path) -> list[Path]:
    """The parquet files of a stage folder, sorted, as absolute paths; a clear error when there are none."""
    files = sorted(Path(path).absolute().glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{path}: no parquet files (has the stage that writes it run?)")
    return files


def row_groups(pf: pq.ParquetFile, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups of ``pf`` holding rows ``[start, stop)``, and the file row where the first of them starts."""
    groups, first, seen = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if seen + n > start and seen < stop:
            groups.append(g)
            first = seen if first is None else first
        seen += n
    return groups, first or 0


def _read_parquet_files(batch: dict[str, Any], block_rows: int) -> Iterator[pa.Table]:
    """Ray Data UDF: stream rows ``[start, stop)`` of each given parquet file in blocks of ``block_rows``,
    reading only the row groups that hold them."""
    for path, start, stop in zip(batch["file"], batch["start"], batch["stop"], strict=True):
        pf = pq.ParquetFile(str(path))
        groups, seen = row_groups(pf, start, stop)
        for b in pf.iter_batches(batch_size=block_rows, row_groups=groups):
            lo, hi = max(start - seen, 0), min(stop - seen, b.num_rows)
            seen += b.num_rows
            if lo < hi:
                yield pa.Table.from_batches([b.slice(lo, hi - lo)])


def read_canonical(
    path: str | Path, num_cpus: float | None = None, block_rows: int = BATCH_ROWS, slice_rows: int | None = None
) -> Any:
    """The parquet rows of a stage folder (e.g. ``data/``) as a streaming Ray Dataset.

    Files are listed here, in the driver, not by a Ray task (``ray.data.read_parquet`` lists in a task that
    claims a whole CPU, which never runs while an actor pool downstream holds every core). Pass
    ``num_cpus=IO_CPUS`` in that situation: parquet reads are I/O bound. Ray Data merges one task's output into
    a single block, and an actor pool hands out whole blocks: ``slice_rows`` cuts each file into read tasks of
    that many rows, so a pool gets enough blocks to keep every actor busy."""
    import ray.data

    files = parquet_files(path)
    items = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        step = max(1, slice_rows or n)
        items += [{"file": str(f), "start": a, "stop": min(a + step, n)} for a in range(0, max(n, 1), step)]
    listing: Any = ray.data.from_items(items, override_num_blocks=len(items))
    return listing.map_batches(
        _read_parquet_files, batch_size=1, num_cpus=num_cpus or 1, fn_kwargs={"block_rows": block_rows}
    )


def map_on_actor_pool(
    ds: Any,
    cls: type,
    kwargs: dict[str, Any],
    *,
    keys: tuple[str, str],
    batch_size: int,
    actors: int,
    actor_cpus: float,
    gpus: float = 0,
) -> Any:
    """``ds.map_batches`` of a callable class (pyarrow batches of ``batch_size`` rows) on a pool of ``actors``
    replicas with ``actor_cpus`` CPUs and ``gpus`` GPUs each, after checking that the pool leaves the read and
    write tasks a CPU share (``keys`` name the config entries for the actor count and CPUs in the error)."""
    import ray.data

    from raydora.cluster import check_pool_fits

    check_pool_fits(actors, actor_cpus, keys, IO_CPUS, gpus)
    return ds.map_batches(
        cls,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
        num_cpus=actor_cpus,
    )


def map_in_this_process(ds: Any, cls: type, kwargs: dict[str, Any], folder: Path, *, batch_size: int) -> int:
    """:func:`map_on_actor_pool` and :func:`write_rows` without actors: one ``cls(**kwargs)`` in this process over
    ``ds``'s batches of ``batch_size`` rows in their input order, written into ``folder`` in files cut as
    :func:`write_rows` cuts them (the training plan's shuffle blocks end at file ends, so the same files keep the
    same batches). Its ``close()``, if any, is called at the end. Returns the rows written."""
    folder.mkdir(parents=True, exist_ok=True)
    fn = cls(**kwargs)
    rows, pending, files = 0, [], 0
    try:
        for batch in ordered(ds).iter_batches(batch_size=batch_size, batch_format="pyarrow"):
            pending.append(fn(batch))
            if sum(t.num_rows for t in pending) >= ROWS_PER_FILE:
                rows += write_part(pending, folder, files)
                pending, files = [], files + 1
        return rows + write_part(pending, folder, files)
    finally:
        close = getattr(fn, "close", None)
        if callable(close):
            close()


def map_rows(
    ds: Any,
    cls: type,
    kwargs: dict[str, Any],
    folder: Path,
    *,
    keys: tuple[str, str],
    batch_size: int,
    actors: int,
    actor_cpus: float,
    gpus: float = 0,
) -> int:
    """``ds`` through the callable class ``cls`` into ``folder``'s parquet files, in input order: on a pool of
    ``actors`` (:func:`map_on_actor_pool`, :func:`write_rows`), or in this process for ``actors=0``
    (:func:`map_in_this_process`). Returns the rows written."""
    if actors == 0:
        return map_in_this_process(ds, cls, kwargs, folder, batch_size=batch_size)
    pool = map_on_actor_pool(
        ds, cls, kwargs, keys=keys, batch_size=batch_size, actors=actors, actor_cpus=actor_cpus, gpus=gpus
    )
    return write_rows(pool, folder)


def parquet_rows(folder: Path) -> int:
    """Rows in the parquet files of ``folder``, counted from their footers."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in folder.glob("*.parquet"))


def ordered(ds: Any) -> Any:
    """``ds`` set to keep its input's row order (``preserve_order``; the setting belongs to the dataset's lineage,
    not to Ray's global context). Without it blocks are written in the order they finish, which changes from run to
    run, and the trainer's plan indexes rows by position: the same seed then trains on different batches."""
    ds.context.execution_options.preserve_order = True
    return ds


def ordered_ingest() -> Any:
    """Ray Train ``DataConfig`` execution options that keep the input's order (the current resource limits kept):
    the datasets handed to workers arrive in the same order on every run."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True)


@contextmanager
def in_this_process(datasets: Iterable[Any]) -> Iterator[None]:
    """Around a training loop called in the driver instead of on Ray Train workers (``num_workers=0``): the
    ``datasets`` keep their input's order, as ``DataConfig(execution_options=ordered_ingest())`` keeps it for
    workers, and this process's torch threads, which the loop may set, are restored after."""
    import torch

    for ds in datasets:
        ds.context.execution_options = ordered_ingest()
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class OrderedParquetSink:
    """A Ray Data datasink that writes each write task's blocks, in the order they arrive, into one parquet file
    named by the task's index (``part-000003.parquet``): with ``preserve_order`` the task indices follow the input,
    so the sorted files hold the rows in the input's order. Ray's own parquet sink hands a task's blocks to
    ``pyarrow.dataset.write_dataset`` with threads and without its ``preserve_order``, which swaps blocks inside a
    file now and then (seen in CI: rows 20-23 written before 16-19)."""

    def __init__(self, folder: Path, min_rows_per_file: int | None = None) -> None:
        self.folder = str(folder)
        self._min_rows = min_rows_per_file

    def write(self, blocks: Any, ctx: Any) -> int:
        from ray.data.block import BlockAccessor

        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        return write_part(tables, Path(self.folder), ctx.task_idx)


def write_part(tables: list[pa.Table], folder: Path, index: int) -> int:
    """The rows of ``tables``, in order, as one parquet file ``folder/part-<index>.parquet`` (nothing for no rows;
    schemas unified, so a batch whose list column is all null fits); returns its rows."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return 0
    schema = pa.unify_schemas([t.schema for t in tables], promote_options="permissive")
    final = folder / f"part-{index:06d}.parquet"
    partial = final.with_name(f".{final.name}.partial")  # a retried task never leaves half a file behind
    with pq.ParquetWriter(partial, schema) as writer:
        for table in tables:
            writer.write_table(table.select(schema.names).cast(schema))
    os.replace(partial, final)
    return sum(t.num_rows for t in tables)


def _datasink(folder: Path, min_rows_per_file: int | None) -> Any:
    """``OrderedParquetSink`` as a subclass of Ray's ``Datasink`` (imported here: ``raydora.data`` loads without
    Ray Data)."""
    from ray.data import Datasink

    class _Sink(OrderedParquetSink, Datasink):  # type: ignore[type-arg]
        def on_write_start(self, schema: Any = None) -> None:
            Path(self.folder).mkdir(parents=True, exist_ok=True)

        @property
        def min_rows_per_write(self) -> int | None:
            return self._min_rows

        def get_name(self) -> str:
            return "WriteParquet"

    return _Sink(folder, min_rows_per_file)


ROWS_PER_FILE = 20_000  # a stage's parquet files hold at least this many rows (the last one fewer)


def write_rows(ds: Any, folder: Path, min_rows_per_file: int | None = ROWS_PER_FILE) -> int:
    """Write a Ray Dataset as parquet into ``folder`` (created even when empty), in its input's order (``ordered``
    and ``OrderedParquetSink``), with IO-sized write tasks next to actor pools; returns the rows written, counted
    from the files' footers."""
    folder.mkdir(parents=True, exist_ok=True)
    ordered(ds).write_datasink(_datasink(folder, min_rows_per_file), ray_remote_args={"num_cpus": IO_CPUS})
    return parquet_rows(folder)
