"""The validate stage: every row of the input into ``data/`` or ``quarantine/``, checked before it commits.

A malformed record never fails the stage: it lands in ``quarantine/`` with its original bytes, file, line and a
named ``reason``, and ``valid + quarantined (+ held out) == input`` is checked before ``data/`` is committed. No
valid row at all is an error (:class:`NoValidRowsError`). On top of the row rules (``schema``) the stage holds out
a share of the prompts, quarantines rows over the token limits (``data.truncation=drop``, :class:`TokenLimits`),
trains the run's tokenizer for a preset policy, and reads ``data.target`` / checks ``data.target_sources``. The
inputs themselves are listed and read in :mod:`raydora.inputs`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raydora import schema
from raydora.config import RunConfig
from raydora.data import CANONICAL_SCHEMA, ordered, parquet_rows, read_canonical, write_rows
from raydora.inputs import (
    CHUNK_BYTES,
    QUARANTINE_SCHEMA,
    READABLE,
    STAGED_SCHEMA,
    InputError,
    input_fingerprints,
    is_hub,
    list_inputs,
    read_staged,
    scan_inputs,
)
from raydora.rundir import (
    StageResult,
    file_fingerprints,
    fingerprint,
    is_done,
    promote,
    read_success,
    staging,
    write_success,
)


class NoValidRowsError(InputError):
    """Validation left no valid row: nothing is committed to ``data/``, and ``quarantine/`` holds every row."""


def warn_skipped(root: str | Path, skipped: list[str]) -> None:
    """Print which files under the input folder ``root`` are not read (never skipped silently)."""
    if not skipped:
        return
    names = [os.path.relpath(f, Path(root).absolute()) for f in skipped]
    more = f" and {len(names) - 10} more (listed in data/_SUCCESS)" if len(names) > 10 else ""
    print(
        f"[validate] warning: skipping {len(names)} file(s) in {root} that are not inputs ({READABLE}): "
        f"{', '.join(names[:10])}{more}",
        flush=True,
    )


@dataclass(frozen=True)
class TokenLimits:
    """Token limits that validate enforces (``data.truncation=drop``): rows over them go to quarantine."""

    max_length: int
    max_prompt_length: int | None = None
    tokenizer: str | None = None  # None: the tokenizer validate trains into ``tokenizer_out``


def check_token_lengths(batch: pa.Table, limits: dict[str, Any], tokenizer: str) -> pa.Table:
    """Ray Data UDF over staged rows: a valid or held-out row whose prompt exceeds ``max_prompt_length`` tokens, or
    whose prompt + a response (+ EOS) exceeds ``max_length``, becomes a quarantine row (``over_length``, the field
    and the token counts in the detail, the row as JSON in ``raw``). Tokens are counted as training encodes them."""
    from raydora.encoding import prompt_tokens
    from raydora.models import load_tokenizer

    tok = load_tokenizer(tokenizer)
    max_length, max_prompt = limits["max_length"], limits["max_prompt_length"]
    rows = batch.to_pylist()
    for row in rows:
        if row["kind"] == "quarantine":
            continue
        n_prompt = len(prompt_tokens(tok, row["prompt"], row["prompt_messages"]))
        n_resp = [len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in row["responses"]]
        longest = max(range(len(n_resp)), key=lambda i: n_resp[i])
        if max_prompt is not None and n_prompt > max_prompt:
            field, detail = "prompt", f"{n_prompt} prompt tokens > model.max_prompt_length={max_prompt}"
        elif n_prompt + n_resp[longest] > max_length:
            field = f"responses[{longest}]"
            detail = f"{n_prompt} prompt + {n_resp[longest]} response tokens > model.max_length={max_length}"
        else:
            continue
        canonical = {k: row[k] for k in CANONICAL_SCHEMA.names}
        raw = json.dumps(canonical, ensure_ascii=False).encode("utf-8", "surrogatepass")
        row.update(kind="quarantine", reason="over_length", field=field, detail=detail, raw=raw)
    return pa.Table.from_pylist(rows, schema=STAGED_SCHEMA)


def _quarantine_reasons(folder: Path) -> dict[str, int]:
    """Rows per reason in a quarantine folder; prints a warning naming each damaged compressed file."""
    reasons: dict[str, int] = {}
    for f in sorted(folder.glob("*.parquet")):
        table = pq.read_table(f, columns=["reason", "file", "detail"])
        for r in table.column("reason").to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        for row in table.filter(pc.equal(table["reason"], "corrupt_file")).to_pylist():
            print(f"[validate] warning: {row['file']} is damaged, rows after the damage are lost: {row['detail']}")
    return reasons


def _fail_without_valid_rows(
    input: str | Path, out: Path, tmp: Path, counts: dict[str, int], reasons: dict[str, int], skipped: list[str]
) -> None:
    """Keep the quarantine for inspection, remove a ``data/`` left by an earlier input (no later stage may train
    on it), and raise :class:`NoValidRowsError` saying why and where to look."""
    if (out / "data").exists():
        shutil.rmtree(out / "data")
    promote(tmp / "quarantine", out / "quarantine")  # this input's quarantine, not an earlier one's
    if not counts["input"]:
        raise NoValidRowsError(
            f"{input}: no rows to validate (the input files are empty)"
            + (f"; {len(skipped)} file(s) that are not inputs were skipped" if skipped else "")
        )
    if counts.get("heldout"):
        raise NoValidRowsError(
            f"{input}: no row left to train on: all {counts['heldout']} valid rows of {counts['input']} were held out "
            f"(data.heldout_fraction); lower it, or give held-out prompts in generate.prompts"
        )
    by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    raise NoValidRowsError(
        f"{input}: no valid row, all {counts['input']} were quarantined ({by_reason}). Nothing was written to "
        f"{out / 'data'}; the quarantined rows (file, line, reason, field, detail and the original bytes) are in "
        f"{out / 'quarantine'}. Fix the input, or set the layout with --format / data.format, and rerun."
    )


def validate(
    input: str | Path,
    output: str | Path,
    fmt: str = "auto",
    max_chars: int = 20000,
    tokenizer: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    force: bool = False,
    *,
    heldout_fraction: float = 0.0,
    tokenizer_out: str | Path | None = None,
    vocab_size: int = 512,
    limits: TokenLimits | None = None,
) -> StageResult:
    """Validate everything under ``input`` into ``output/data`` and ``output/quarantine`` (atomically).

    - ``heldout_fraction``: that share of the prompts (by :func:`raydora.inputs.heldout_bucket`) goes to
      ``output/heldout`` instead of ``data/``;
    - ``tokenizer_out``: a BPE of ``vocab_size`` is trained on the valid rows into that folder (the run's
      tokenizer for a preset policy);
    - ``limits``: rows over the token limits go to quarantine (``over_length``), counted with ``limits.tokenizer``
      or the tokenizer just trained.

    Skips when ``output/data/_SUCCESS`` was written for the same inputs and settings, unless ``force``."""
    out = Path(output)
    extras: list[Any] = [f"heldout={heldout_fraction}"] if heldout_fraction else []
    if tokenizer_out is not None:
        extras.append(f"tokenizer-vocab={vocab_size}")
    if limits is not None:
        extras.append(
            [
                limits.max_length,
                limits.max_prompt_length,
                file_fingerprints(limits.tokenizer) if limits.tokenizer else None,
            ]
        )
    fp = fingerprint("validate", input_fingerprints(input), fmt, max_chars, tokenizer, *extras)
    outputs = {"data": str(out / "data"), "quarantine": str(out / "quarantine")}
    if heldout_fraction:
        outputs["heldout"] = str(out / "heldout")
    if tokenizer_out is not None:
        outputs["tokenizer"] = str(tokenizer_out)
    if not force and is_done(out / "data", fp) and (tokenizer_out is None or Path(tokenizer_out).is_dir()):
        marker = json.loads((out / "data" / "_SUCCESS").read_text())
        warn_skipped(input, marker.get("skipped_files", []))
        info = {"reasons": marker["reasons"], "skipped_files": marker.get("skipped_files", [])}
        return StageResult("validate", outputs, marker["rows"], skipped=True, info=info)
    skipped = [] if is_hub(input) else [str(f) for f in scan_inputs(input)[1]]
    warn_skipped(input, skipped)
    with staging(out, "validate") as tmp:
        write_rows(read_staged(input, fmt, max_chars, tokenizer, chunk_bytes, heldout_fraction), tmp / "staged", None)
        staged_dir = tmp / "staged"
        if tokenizer_out is not None:
            from raydora.reference import data_corpus, write_tokenizer

            write_tokenizer(lambda: data_corpus(staged_dir, kinds=("valid",)), tmp / "tokenizer", fp, vocab_size)
        if limits is not None and list(staged_dir.glob("*.parquet")):
            tok = limits.tokenizer or str(tmp / "tokenizer")
            checked = ordered(read_canonical(staged_dir)).map_batches(
                check_token_lengths,
                batch_format="pyarrow",
                fn_kwargs={
                    "limits": {"max_length": limits.max_length, "max_prompt_length": limits.max_prompt_length},
                    "tokenizer": str(Path(tok).absolute()),
                },
            )
            write_rows(checked, tmp / "checked", None)
            staged_dir = tmp / "checked"
        kinds = {"data": "valid", "heldout": "heldout", "quarantine": "quarantine"}
        if list(staged_dir.glob("*.parquet")):  # an empty input stages nothing
            staged = ordered(read_canonical(staged_dir))
            canonical, quarantine = [f.name for f in CANONICAL_SCHEMA], [f.name for f in QUARANTINE_SCHEMA]
            for name, kind in kinds.items():
                columns = quarantine if kind == "quarantine" else canonical
                write_rows(staged.filter(expr=f"kind == '{kind}'").select_columns(columns), tmp / name, None)
        for name in kinds:
            (tmp / name).mkdir(exist_ok=True)  # Ray writes no folder for an empty dataset
        counts = {
            "input": parquet_rows(tmp / "staged"),
            "valid": parquet_rows(tmp / "data"),
            "quarantined": parquet_rows(tmp / "quarantine"),
        }
        if heldout_fraction:
            counts["heldout"] = parquet_rows(tmp / "heldout")
        if counts["valid"] + counts.get("heldout", 0) + counts["quarantined"] != counts["input"]:
            raise RuntimeError(f"row counts do not add up, nothing committed: {counts}")
        reasons = _quarantine_reasons(tmp / "quarantine")
        if counts["valid"] == 0:
            _fail_without_valid_rows(input, out, tmp, counts, reasons, skipped)
        write_success(
            tmp / "data",
            {
                "stage": "validate",
                "fingerprint": fp,
                "input": str(input),
                "rows": counts,
                "reasons": dict(sorted(reasons.items())),
                "skipped_files": skipped,
            },
        )
        promote(tmp / "quarantine", out / "quarantine")
        if heldout_fraction:
            write_success(tmp / "heldout", {"stage": "validate", "fingerprint": fp, "rows": counts["heldout"]})
            promote(tmp / "heldout", out / "heldout")
        if tokenizer_out is not None:
            promote(tmp / "tokenizer", Path(tokenizer_out))
        promote(tmp / "data", out / "data")  # the commit point: data/ arrives with its marker
    return StageResult("validate", outputs, counts, info={"reasons": reasons, "skipped_files": skipped})


def source_counts(folder: str | Path) -> dict[str, int]:
    """Responses per source in a canonical parquet folder (one column read in this process)."""
    counts: dict[str, int] = {}
    for f in sorted(Path(folder).glob("*.parquet")):
        for sources in pq.read_table(f, columns=["sources"]).column("sources").to_pylist():
            for s in sources:
                counts[s] = counts.get(s, 0) + 1
    return counts


def check_target_sources(targets: tuple[str, ...], counts: dict[str, int], folder: str | Path) -> None:
    """Fail, listing the sources found with their counts, when the data has no response from ``targets`` or no
    other (synthetic) source to tell them apart from: DoRA's classifiers would have nothing to learn."""
    found = ", ".join(f"{s} ({n})" for s, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"
    if not any(counts.get(t, 0) for t in targets):
        raise InputError(
            f"data.target_sources={list(targets)}: no response in {folder} comes from these sources. Sources found "
            f"(responses): {found}. Set data.target_sources to the sources whose responses are the target "
            "distribution (e.g. human-written or curated ones), or give rows a `sources` column (TRL layouts: "
            "`chosen_source` / `rejected_source`); docs/real-data.md"
        )
    if not [s for s in counts if s not in (*targets, schema.UNKNOWN_SOURCE)]:
        raise InputError(
            f"data.target_sources={list(targets)}: every response in {folder} is a target or unknown (sources "
            f"found: {found}); the classifiers need at least one other named source to compare with"
        )


def target_rows(table: pa.Table, source: str) -> list[dict[str, Any]]:
    """``data.target``'s rows as canonical one-response rows (source ``target``): each row's ``prompt`` with its
    ``response``, each of its ``responses``, or TRL's ``chosen`` (text, or the assistant turns of messages)."""
    names = set(table.column_names)
    field = next((f for f in ("response", "responses", "chosen") if f in names), None)
    if "prompt" not in names or field is None:
        raise InputError(
            f"{source}: data.target rows need a `prompt` and a `response` (or `responses`, or TRL's "
            f"`chosen`) column; found: {', '.join(sorted(names))}"
        )
    rows = []
    for i, row in enumerate(table.select(["prompt", field]).to_pylist(), start=1):
        value = row[field]
        answers = value if isinstance(value, list) and field == "responses" else [value]
        for j, answer in enumerate(answers):
            if isinstance(answer, list):  # messages: the assistant turns
                answer = "\n".join(
                    m.get("content", "") for m in answer if isinstance(m, dict) and m.get("role") == "assistant"
                )
            if not isinstance(row["prompt"], str) or not isinstance(answer, str) or not answer.strip():
                raise InputError(f"{source}: row {i}: data.target needs a text `prompt` and a non-empty `{field}`")
            rows.append(
                {
                    "id": f"target-{schema.row_id(row['prompt'], [answer])}-{j}",
                    "prompt": row["prompt"],
                    "responses": [answer],
                    "scores": [1.0],
                    "sources": ["target"],
                    "split": None,
                    "meta": None,
                    "prompt_messages": None,
                }
            )
    if not rows:
        raise InputError(f"{source}: data.target holds no rows")
    return rows


def write_target(path: str | Path, out_dir: Path, force: bool = False) -> int:
    """``data.target`` into ``out_dir`` (one parquet file of canonical one-response rows, atomically); returns the
    row count. Read in this process: a curated target set is small."""
    from raydora.generate import _read_table

    fp = fingerprint("target", input_fingerprints(path))
    if not force and is_done(out_dir, fp):
        return int((read_success(out_dir) or {}).get("rows", {}).get("target", 0))
    rows = [r for f, kind in list_inputs(path) for r in target_rows(_read_table(f, kind), str(f))]
    with staging(out_dir.parent, out_dir.name) as tmp:
        (tmp / "rows").mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=CANONICAL_SCHEMA), tmp / "rows" / "target.parquet")
        write_success(
            tmp / "rows", {"stage": "target", "fingerprint": fp, "input": str(path), "rows": {"target": len(rows)}}
        )
        promote(tmp / "rows", out_dir)
    return len(rows)


def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage: validate ``cfg.data.input`` (default: the synth stage's ``train`` split) into the run.

    On your own data (``data.input``) it also holds out ``data.heldout_fraction`` of the prompts into ``heldout/``
    when ``generate.prompts`` is unset, and trains the run's tokenizer on the valid rows for a preset policy without
    ``model.tokenizer``. ``data.truncation=drop`` quarantines rows over the token limits; objectives that read
    p_golden check ``data.target_sources`` against the sources found."""
    from raydora.config import P_GOLDEN_OBJECTIVES
    from raydora.reference import needs_run_tokenizer, tokenizer_dir

    run_dir = Path(run_dir)
    own = cfg.data.input is not None
    source = cfg.data.input or str(run_dir / "synth" / "train")
    train_tokenizer = needs_run_tokenizer(cfg) and read_success(run_dir / "synth") is None
    limits = None
    if cfg.data.truncation == "drop":
        tok = None if train_tokenizer else str(tokenizer_dir(cfg, run_dir))
        limits = TokenLimits(cfg.model.max_length, cfg.model.max_prompt_length, tok)
    heldout = cfg.data.heldout_fraction if own and cfg.generate.prompts is None else 0.0
    result = validate(
        source,
        run_dir,
        cfg.data.format,
        cfg.data.max_chars,
        cfg.model.tokenizer,
        heldout_fraction=heldout,
        tokenizer_out=run_dir / "tokenizer" if train_tokenizer else None,
        vocab_size=cfg.model.vocab_size,
        limits=limits,
        force=force,
    )
    if cfg.data.target is not None:
        result.counts["target"] = write_target(cfg.data.target, run_dir / "target", force=force)
    elif cfg.train.objective in P_GOLDEN_OBJECTIVES:
        check_target_sources(tuple(cfg.data.target_sources), source_counts(run_dir / "data"), run_dir / "data")
    return result
