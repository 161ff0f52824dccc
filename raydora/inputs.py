"""Input files read into staged canonical rows with Ray Data: what the validate stage (:mod:`raydora.validate`)
reads.

Inputs: JSONL / JSON, parquet (each also gzip / bz2 / xz / zstd compressed), a saved HF ``datasets`` folder, a
folder of such files, or ``hf://ORG/NAME[@config][:split]`` from the local HF datasets cache (offline), in the
canonical, TRL (string, conversational, implicit-prompt) or RRHF layouts (see ``schema``). The driver plans the
reads (:func:`plan_reads`): large plain files are cut into byte ranges at line boundaries and read as a stream, so
inputs may exceed memory; a compressed file is one read task that decompresses as it streams. Each read task
(:func:`read_and_validate`) yields rows of :data:`STAGED_SCHEMA`: valid, held out, or quarantined. A malformed
record never fails the read: it becomes a quarantine row with its original bytes, file, line and a named
``reason``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydora import schema
from raydora.data import BATCH_ROWS, CANONICAL_SCHEMA
from raydora.rundir import file_fingerprints

CHUNK_BYTES = 64 << 20  # one read task per 64 MiB of JSONL / parquet

QUARANTINE_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),  # 1-based line (JSONL) or row number (JSON array, parquet, HF datasets)
        ("reason", pa.string()),
        ("field", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.binary()),  # the original bytes (JSONL), or the row as JSON (parquet, HF datasets)
    ]
)
# What a read task yields: one schema for both kinds, split by `kind` before writing.
STAGED_SCHEMA = pa.schema([("kind", pa.string()), *CANONICAL_SCHEMA, *QUARANTINE_SCHEMA])


SUFFIX_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}  # suffix -> codec, after a kind suffix
# What a damaged compressed file raises while it is decompressed (gzip/bz2: OSError, EOFError when truncated,
# zlib.error on a bad deflate block; xz: LZMAError; zstd via pyarrow: OSError / ArrowException).
DECOMPRESS_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, lzma.LZMAError, zlib.error, pa.ArrowException)


class InputError(ValueError):
    """An input the validate stage cannot use (unsupported, empty, nothing valid, not in the HF cache): the message
    says what and where, and the ``raydora`` command prints it and exits 1 without a traceback."""


# ---- compressed files ---------------------------------------------------------------------------------------------
def compression(path: str | Path) -> str | None:
    """The codec of ``path`` from its last suffix (gzip, bz2, xz, zstd), or None for a plain file."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def open_input(path: str | Path, codec: str | None = None) -> io.BufferedIOBase:
    """``path`` opened for binary reading, decompressed as a stream when ``codec`` is set (never read whole):
    gzip / bz2 / xz through the standard library, zstd through ``zstandard`` when installed, else pyarrow."""
    if codec is None:
        return open(path, "rb")
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "bz2":
        return bz2.open(path, "rb")
    if codec == "xz":
        return lzma.open(path, "rb")
    if codec != "zstd":
        raise ValueError(f"unknown compression {codec!r}")
    try:
        import zstandard
    except ImportError:
        return io.BufferedReader(pa.CompressedInputStream(pa.OSFile(str(path)), "zstd"))
    raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return io.BufferedReader(raw)


def _decompress_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return DECOMPRESS_ERRORS
    return (*DECOMPRESS_ERRORS, zstandard.ZstdError)


@contextmanager
def decompressed_parquet(path: Path, codec: str) -> Iterator[Path]:
    """A compressed parquet file decompressed into a temporary file (parquet needs random access to its footer)."""
    with tempfile.TemporaryDirectory(prefix="raydora-parquet-") as tmp:
        out = Path(tmp) / path.name[: -len(path.suffix)]
        with open_input(path, codec) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        yield out


def _starts_json_array(path: Path, codec: str | None) -> bool:
    """True when the first non-blank byte of the (decompressed) file, after a UTF-8 BOM, is ``[``."""
    with open_input(path, codec) as f:
        head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
        while head and not head.strip():
            head = f.read(1 << 16)
    return head.lstrip().startswith(b"[")


# ---- hf:// inputs: a dataset in the local HF datasets cache ------------------------------------------------------
HUB_PREFIX = "hf://"


def is_hub(path: str | Path) -> bool:
    """True for ``hf://ORG/NAME[@config][:split]``, a dataset read from the local HF datasets cache."""
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub(uri: str) -> tuple[str, str | None, str | None]:
    """``hf://ORG/NAME[@config][:split]`` -> (``ORG/NAME``, config or None, split or None)."""
    name, colon, split = uri[len(HUB_PREFIX) :].partition(":")
    repo, at, config = name.partition("@")
    parts = repo.split("/")
    if not all(parts) or len(parts) > 2 or (at and not config) or (colon and not split) or "[" in split:
        raise InputError(f"{uri}: expected hf://ORG/NAME, optionally with @CONFIG and :SPLIT (a split name, no slice)")
    return repo, config or None, split or None


def hub_cache_dir() -> Path:
    """The HF datasets cache hf:// inputs are read from (``HF_DATASETS_CACHE``, else ``$HF_HOME/datasets``)."""
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """datasets and huggingface_hub in offline mode, whatever HF_HUB_OFFLINE was when they were imported (they read
    it once), with datasets' own cache-hit warnings silenced."""
    import datasets
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    verbosity = datasets.logging.get_verbosity()
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
        datasets.logging.set_verbosity(verbosity)


def hub_arrow_files(uri: str) -> list[tuple[Path, str | None]]:
    """The cached Arrow files of ``hf://ORG/NAME[@config][:split]`` with their split names, found by
    ``datasets.load_dataset`` offline (it never reaches the network). A dataset, config or split that is not in the
    cache is an :class:`InputError` naming the cache folder and how to fill it."""
    import datasets

    repo, config, split = parse_hub(uri)
    cache = hub_cache_dir()
    with _hub_offline():
        try:
            loaded = datasets.load_dataset(
                repo, config, split=split, cache_dir=str(cache), download_mode="reuse_dataset_if_exists"
            )
        except (ConnectionError, FileNotFoundError, ValueError) as e:  # offline: what datasets raises on a miss
            reason = str(e).splitlines()[0]
            if "multiple" in reason and "configurations" in reason:
                raise InputError(f"{uri}: {reason} in {cache}; pick one with hf://{repo}@CONFIG") from None
            args = ", ".join(repr(a) for a in (repo, config) if a) + (f", split={split!r}" if split else "")
            raise InputError(
                f"{uri}: not found in the local HF datasets cache {cache} (hf:// inputs are read offline, never "
                f"downloaded): {reason}\nTo fill the cache, run on a machine with internet, with the same HF_HOME / "
                f'HF_DATASETS_CACHE: python -c "import datasets; datasets.load_dataset({args})" and copy {cache} '
                f"here; or save it with datasets.load_dataset({args}).save_to_disk('FOLDER') and pass that folder "
                "as data.input."
            ) from None
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(split, loaded)]
    files = [(Path(c["filename"]), name) for name, ds in splits for c in ds.cache_files]
    if not files:
        raise InputError(f"{uri}: the cached dataset has no Arrow files in {cache}")
    return files


def input_fingerprints(path: str | Path) -> list[Any]:
    """What a rerun compares to decide whether the input changed: (name, size, mtime) of every input file; for
    hf:// the URI and its cached Arrow files (a refreshed cache writes new files)."""
    if is_hub(path):
        return [str(path), *(file_fingerprints(f)[0] for f, _ in hub_arrow_files(str(path)))]
    return file_fingerprints(path)


# ---- planning (driver side) ------------------------------------------------------------------------------------
def _kind(path: Path) -> str | None:
    """jsonl / json / parquet for a file (plain or compressed), hf for a saved HF datasets folder, else None."""
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        return None
    name = path.name.lower()
    if compression(path):
        name = name[: -len(path.suffix)]
    return SUFFIX_KINDS.get(Path(name).suffix)


READABLE = ".jsonl, .ndjson, .json or .parquet, each optionally compressed as .gz, .bz2, .xz or .zst"


def scan_inputs(path: str | Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``(inputs, skipped)``: every readable input under ``path`` as (path, kind), kind in jsonl / json / parquet /
    hf, and every other file found in its folders (``notes.txt``, ``data.csv``: files it cannot read, which the
    caller reports). Names starting with ``.`` or ``_`` (hidden files, ``_SUCCESS`` markers) are left out of
    both. Raises when ``path`` is missing, is a file of another type, or holds no input at all."""
    p = Path(path).absolute()  # tasks run in Ray workers, whose working folder may differ
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    kind = _kind(p)
    if kind:
        return [(p, kind)], []
    if p.is_file():
        raise InputError(f"{p}: unsupported file type (expected {READABLE}, or a saved HF datasets folder)")
    found: list[tuple[Path, str]] = []
    skipped: list[Path] = []

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith((".", "_")):
                continue
            k = _kind(child)
            if k:
                found.append((child, k))
            elif child.is_dir():
                walk(child)
            else:
                skipped.append(child)

    walk(p)
    if not found:
        shown = "".join(f"\n  {f.relative_to(p)}" for f in skipped[:10])
        more = f"\n  ... and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        raise InputError(
            f"{p}: no input inside (readable: {READABLE}, or saved HF datasets folders)"
            + (f"; {len(skipped)} other file(s) found:{shown}{more}" if skipped else "")
        )
    return found, skipped


def list_inputs(path: str | Path) -> list[tuple[Path, str]]:
    """Every readable input under ``path`` as (path, kind), kind in jsonl / json / parquet / hf (see
    :func:`scan_inputs`, which also returns the files it skipped). Not for hf:// inputs (:func:`hub_arrow_files`)."""
    if is_hub(path):
        raise InputError(f"{path}: hf:// inputs are read by the validate stage only; save the dataset to a folder")
    return scan_inputs(path)[0]


def _jsonl_chunks(path: Path, chunk_bytes: int) -> list[tuple[int, int, int]]:
    """Byte ranges ``(start, end, first_line)`` cut at line ends. Counts newlines to number the lines."""
    size = path.stat().st_size
    chunks, start, line = [], 0, 1
    with path.open("rb") as f:
        while start < size:
            target = start + chunk_bytes
            if target >= size:
                chunks.append((start, size, line))
                break
            f.seek(start)
            newlines, left = 0, target - start
            while left > 0:
                block = f.read(min(left, 8 << 20))
                newlines += block.count(b"\n")
                left -= len(block)
            rest = f.readline()  # finish the line that straddles the cut
            end = target + len(rest)
            newlines += rest.endswith(b"\n")
            chunks.append((start, end, line))
            line, start = line + newlines, end
    return chunks or [(0, 0, 1)]


def _sniff_format(path: Path, kind: str) -> str | None:
    """Detect the layout from the first parseable records of one input (majority vote)."""
    votes: dict[str, int] = {}
    for record in _sample_records(path, kind):
        fmt = schema.detect_format(record) if isinstance(record, dict) else None
        if fmt:
            votes[fmt] = votes.get(fmt, 0) + 1
    return max(votes, key=lambda k: votes[k]) if votes else None


def _sample_records(path: Path, kind: str, n: int = 50) -> list[Any]:
    """The first ``n`` records of one input (fewer when it is damaged: sniffing never fails the plan, the read task
    then quarantines what it cannot read)."""
    codec = compression(path) if kind not in ("hf", "arrow") else None
    out: list[Any] = []
    if kind == "parquet":
        if codec:
            try:
                with decompressed_parquet(path, codec) as plain:
                    return _sample_records(plain, kind, n)
            except _decompress_errors():
                return []
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows:
            out = next(pf.iter_batches(batch_size=n)).to_pylist()
    elif kind == "hf":
        for arrow_file, _ in _hf_arrow_files(path):
            return _sample_records(arrow_file, "arrow", n)
    elif kind == "arrow":  # one Arrow stream file of an HF dataset
        with pa.memory_map(str(path)) as src:
            out = next(iter(pa.ipc.open_stream(src)), pa.record_batch([])).slice(0, n).to_pylist()
    else:
        head = b""
        try:
            with open_input(path, codec) as f:
                while len(head) < 1 << 16 and (block := f.readline(1 << 16)):  # lines: keep what precedes damage
                    head += block
                if kind == "json" and head.lstrip(b"\xef\xbb\xbf").lstrip().startswith(b"["):
                    try:
                        value = json.loads(head + f.read())
                        return value[:n] if isinstance(value, list) else []
                    except (ValueError, UnicodeDecodeError):
                        return []
        except _decompress_errors():
            pass  # a damaged compressed file: sniff what was read; its read task quarantines the rest
        for raw in head.splitlines()[:n]:
            try:
                out.append(schema.parse_json_line(raw))
            except schema.RowError:
                continue
    return out


def _hf_arrow_files(path: Path) -> list[tuple[Path, str | None]]:
    """The Arrow files of a saved HF dataset (or DatasetDict), with their split names."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    return [(Path(c["filename"]), name) for name, ds in splits for c in ds.cache_files]


def plan_reads(path: str | Path, fmt: str = "auto", chunk_bytes: int = CHUNK_BYTES) -> list[dict[str, Any]]:
    """One task descriptor per chunk of input: file, kind, layout and the byte / row range to read."""
    if fmt != "auto" and fmt not in schema.FORMATS:
        raise ValueError(f"format must be auto or one of {', '.join(schema.FORMATS)}, got {fmt!r}")
    tasks: list[dict[str, Any]] = []
    if is_hub(path):
        files = hub_arrow_files(str(path))
        forced = None if fmt == "auto" else fmt
        fallback = forced or _sniff_format(files[0][0], "arrow")
        return [
            {"file": str(f), "kind": "hf", "format": forced, "fallback": fallback, "line": 1, "split": split}
            for f, split in files
        ]
    for p, kind in list_inputs(path):
        forced = None if fmt == "auto" else fmt
        codec = compression(p) if kind != "hf" else None
        base = {
            "file": str(p),
            "kind": kind,
            "format": forced,
            "fallback": forced or _sniff_format(p, kind),
            "compression": codec,
        }
        if codec is not None:  # a compressed stream cannot be cut into byte ranges: one task reads it all
            tasks.append({**base, "start": 0, "end": -1, "line": 1, "split": None, "row_groups": None})
        elif kind == "jsonl" or kind == "json":
            for start, end, line in _jsonl_chunks(p, chunk_bytes) if kind == "jsonl" else [(0, -1, 1)]:
                tasks.append({**base, "start": start, "end": end, "line": line, "split": None})
        elif kind == "parquet":
            meta = pq.ParquetFile(p).metadata
            groups, row0, size, first = [], 0, 0, 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                size += meta.row_group(g).total_byte_size
                if size >= chunk_bytes or g == meta.num_row_groups - 1:
                    tasks.append({**base, "row_groups": groups, "line": first + 1, "split": None})
                    first, groups, size = row0 + meta.row_group(g).num_rows, [], 0
                row0 += meta.row_group(g).num_rows
        else:
            for arrow_file, split in _hf_arrow_files(p):
                tasks.append({**base, "file": str(arrow_file), "line": 1, "split": split})
    return tasks


# ---- reading (inside Ray tasks) ---------------------------------------------------------------------------------
def _corrupt(path: Path, codec: str | None, line: int, e: BaseException) -> schema.RowError:
    where = "from the start" if line == 1 else f"after line {line - 1}"
    return schema.RowError("corrupt_file", "", f"{path.name}: the {codec} stream cannot be read {where}: {e}")


def _records(task: dict[str, Any]) -> Iterator[tuple[int, bytes, Any, schema.RowError | None]]:
    """(line, original bytes, parsed record or None, parse error or None) for one task.

    A compressed file that cannot be decompressed (truncated, damaged, or not compressed at all) ends in one
    ``corrupt_file`` record at the line where reading stopped: what was read before it is kept, and the stage's
    counts still add up."""
    path, kind, line, codec = Path(task["file"]), task["kind"], task["line"], task.get("compression")
    errors = _decompress_errors() if codec else ()
    if kind == "parquet" and codec:
        try:
            with decompressed_parquet(path, codec) as plain:
                for item in _records({**task, "file": str(plain), "compression": None, "row_groups": None}):
                    yield item
                    line += 1
        except errors as e:
            yield line, b"", None, _corrupt(path, codec, line, e)
        return
    if kind in ("parquet", "hf"):
        if kind == "parquet":
            batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, row_groups=task["row_groups"])
        else:
            batches = pa.ipc.open_stream(pa.memory_map(str(path)))
        for batch in batches:
            for record in batch.to_pylist():
                if task["split"] is not None and record.get("split") is None:
                    record["split"] = task["split"]
                raw = json.dumps(record, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")
                yield line, raw, record, None
                line += 1
        return
    end = task["end"]
    if kind == "json":
        try:
            array = _starts_json_array(path, codec)
        except errors as e:
            yield line, b"", None, _corrupt(path, codec, line, e)
            return
        if array:
            try:
                with open_input(path, codec) as f:
                    data = f.read()
            except errors as e:
                yield line, b"", None, _corrupt(path, codec, line, e)
                return
            try:
                value = json.loads(data)
            except UnicodeDecodeError as e:
                yield 1, data, None, schema.RowError("invalid_utf8", "", str(e))
                return
            except ValueError as e:
                yield 1, data, None, schema.RowError("malformed_json", "", f"the JSON array does not parse: {e}")
                return
            for i, record in enumerate(value, start=1):
                yield i, json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogatepass"), record, None
            return
        end = -1  # a .json file holding JSON lines: read to its end
    with open_input(path, codec) as f:
        if not codec:
            f.seek(task["start"])
        pos = task["start"]
        while end < 0 or pos < end:
            try:
                raw = f.readline()
            except errors as e:  # only compressed files: a plain file's I/O error fails the task
                yield line, b"", None, _corrupt(path, codec, line, e)
                return
            if not raw:
                break
            pos += len(raw)
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            raw = raw.rstrip(b"\r\n")
            try:
                yield line, raw, schema.parse_json_line(raw), None
            except schema.RowError as e:
                yield line, raw, None, e
            line += 1


def _chat_renderer(tokenizer_path: str | None) -> schema.ChatRenderer:
    if tokenizer_path is None:
        return schema.default_chat_renderer
    from raydora.models import load_tokenizer

    tok = load_tokenizer(tokenizer_path)

    def render(messages: list[dict[str, str]]) -> str:
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    return render


def heldout_bucket(prompt: str) -> float:
    """A stable number in [0, 1) per prompt text: prompts below ``data.heldout_fraction`` are held out, so every
    row of a prompt lands on the same side."""
    digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8, person=b"heldout").digest()
    return int.from_bytes(digest, "big") / 2**64


def read_and_validate(
    batch: dict[str, Any], max_chars: int, tokenizer: str | None = None, heldout_fraction: float = 0.0
) -> Iterator[pa.Table]:
    """Ray Data UDF: read the tasks in ``batch`` (descriptors as JSON text) and yield staged Arrow tables (``kind``
    valid, heldout or quarantine)."""
    render = _chat_renderer(tokenizer)
    rows: list[dict[str, Any]] = []
    for desc in batch["task"]:
        task = json.loads(desc)
        for line, raw, record, error in _records(task):
            row: dict[str, Any] = {"file": task["file"], "line": line}
            try:
                if error is not None:
                    raise error
                row.update(schema.process_record(record, task["format"], max_chars, render, task["fallback"]))
                row["kind"] = "heldout" if heldout_bucket(row["prompt"]) < heldout_fraction else "valid"
            except schema.RowError as e:
                row.update(kind="quarantine", reason=e.reason, field=e.field, detail=e.detail, raw=raw)
            rows.append(row)
            if len(rows) >= BATCH_ROWS:
                yield pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)
                rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)


def read_staged(
    path: str | Path,
    fmt: str = "auto",
    max_chars: int = 20000,
    tokenizer: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    heldout_fraction: float = 0.0,
) -> Any:
    """A streaming Ray Dataset of staged rows (``kind`` = valid / heldout / quarantine) for everything under
    ``path``."""
    import ray.data

    tasks = plan_reads(path, fmt, chunk_bytes)
    descs: Any = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    kwargs = {"max_chars": max_chars, "tokenizer": tokenizer, "heldout_fraction": heldout_fraction}
    return descs.map_batches(read_and_validate, batch_size=1, fn_kwargs=kwargs)
