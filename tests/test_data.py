"""Ray Data reading + validation: every layout and input kind, a messy file that loses nothing, chunked reads,
restarts, and a 1,000-row fuzzed file whose rows are all accounted for."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydora import data, inputs, schema, validate

MESSY = Path(__file__).parent / "data" / "messy.jsonl"
MESSY_REASONS = {  # line -> reason, by construction of tests/data/messy.jsonl
    4: "malformed_json", 5: "invalid_utf8", 6: "blank_line", 7: "not_an_object", 8: "unknown_format",
    9: "missing_field", 10: "wrong_type", 11: "empty_text", 12: "too_few_responses", 13: "length_mismatch",
    14: "nonfinite_score", 15: "tied_scores", 16: "over_length",
}  # fmt: skip

pytestmark = pytest.mark.usefixtures("ray_session")


def _table(folder: Path) -> list[dict]:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_messy_file_loses_nothing_and_names_every_reason(tmp_path: Path) -> None:
    result = validate.validate(MESSY, tmp_path)
    assert result.counts == {"input": 16, "valid": 3, "quarantined": 13}
    quarantined = {r["line"]: r for r in _table(tmp_path / "quarantine")}
    assert {line: r["reason"] for line, r in quarantined.items()} == MESSY_REASONS
    # the file exercises every row-level reason (corrupt_file, a damaged compressed file, is tested below)
    assert set(MESSY_REASONS.values()) == set(schema.REASONS) - {"corrupt_file"}
    raw_lines = MESSY.read_bytes().split(b"\n")
    for line, r in quarantined.items():
        assert r["raw"] == raw_lines[line - 1] and r["file"] == str(MESSY)  # original bytes, kept exactly
    assert quarantined[9]["field"] == "responses" and quarantined[10]["field"] == "responses[1]"
    valid = {r["id"]: r for r in _table(tmp_path / "data")}
    assert set(valid) == {"ok-canonical", "ok-trl", "ok-rrhf"}
    assert valid["ok-trl"]["responses"] == ["yes", "no"] and valid["ok-trl"]["scores"] == [1.0, 0.0]
    assert valid["ok-canonical"]["sources"] == ["golden", "sloppy"]
    marker = json.loads((tmp_path / "data" / "_SUCCESS").read_text())
    assert marker["rows"] == result.counts and sum(marker["reasons"].values()) == 13
    assert not list(tmp_path.glob(".validate.tmp-*"))  # the staging folder is gone


def test_chunked_reads_number_lines_like_one_read(tmp_path: Path) -> None:
    whole = validate.validate(MESSY, tmp_path / "a")
    chunked = validate.validate(MESSY, tmp_path / "b", chunk_bytes=64)
    assert len(inputs.plan_reads(MESSY, chunk_bytes=64)) > 5
    assert whole.counts == chunked.counts
    lines = lambda d: sorted((r["line"], r["reason"]) for r in _table(d / "quarantine"))
    assert lines(tmp_path / "a") == lines(tmp_path / "b")


def test_rerun_skips_until_the_input_changes(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}) + "\n")
    assert not validate.validate(src, tmp_path / "out").skipped
    assert validate.validate(src, tmp_path / "out").skipped
    src.write_text(src.read_text() + json.dumps({"prompt": "q", "responses": ["a", "b"], "scores": [0, 1]}) + "\n")
    again = validate.validate(src, tmp_path / "out")
    assert not again.skipped and again.counts["valid"] == 2


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


def test_every_input_kind(tmp_path: Path) -> None:
    """JSON array, parquet (several row groups), a saved HF DatasetDict, and a folder mixing them with JSONL."""
    import datasets

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.json").write_text(json.dumps(_rows(3)))
    pq.write_table(pa.Table.from_pylist(_rows(10)), src / "b.parquet", row_group_size=4)
    (src / "c.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(2)) + "\n")
    hf = datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(4)),
                               "test": datasets.Dataset.from_list(_rows(2))})  # fmt: skip
    hf.save_to_disk(str(src / "hf"))
    kinds = sorted({k for _, k in inputs.list_inputs(src)})
    assert kinds == ["hf", "json", "jsonl", "parquet"]
    result = validate.validate(src, tmp_path / "out", chunk_bytes=1)
    assert result.counts == {"input": 21, "valid": 21, "quarantined": 0}
    rows = _table(tmp_path / "out" / "data")
    assert sorted(r["split"] for r in rows if r["split"]) == ["test"] * 2 + ["train"] * 4
    assert all(r["scores"] == [1.0, 0.0] for r in rows)


def test_forced_format_quarantines_other_layouts(tmp_path: Path) -> None:
    result = validate.validate(MESSY, tmp_path, fmt="rrhf")
    assert result.counts["valid"] == 1  # only the RRHF row fits the forced layout


def test_fuzzed_file_of_1000_rows_is_fully_accounted_for(tmp_path: Path) -> None:
    """1,000 rows: valid rows of every layout, mutated by random corruptions (truncation, byte flips, field
    deletions, NaN, ties). No crash, every line lands in exactly one place, every reason is named."""
    rng = random.Random(0)
    base = [
        {"prompt": "p", "responses": ["a", "b", "c"], "scores": [3, 2, 1]},
        {"prompt": "q", "chosen": "x", "rejected": "y"},
        {"query": "r", "responses": ["s", "t"], "scores": [0.2, 0.8]},
    ]
    lines: list[bytes] = []
    for i in range(1000):
        rec = json.loads(json.dumps(rng.choice(base)))
        rec["id"] = f"row-{i}"
        op = rng.choice(["keep", "truncate", "flip", "drop", "nan", "tie", "empty", "type"])
        key = rng.choice([k for k in rec if k != "id"])
        if op == "drop":
            del rec[key]
        elif op == "nan" and "scores" in rec:
            rec["scores"][0] = float("nan")
        elif op == "tie" and "scores" in rec:
            rec["scores"] = [1] * len(rec["scores"])
        elif op == "empty":
            rec[key] = ""
        elif op == "type":
            rec[key] = 42
        raw = json.dumps(rec).encode()
        if op == "truncate":
            raw = raw[: rng.randrange(1, len(raw))]
        elif op == "flip":
            pos = rng.randrange(len(raw))
            raw = raw[:pos] + bytes([rng.choice([0xFF, 0xC3, 0x22, 0x7B])]) + raw[pos + 1 :]
        lines.append(raw)
    src = tmp_path / "fuzz.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    result = validate.validate(src, tmp_path / "out", chunk_bytes=4096)
    assert result.counts["input"] == 1000 == result.counts["valid"] + result.counts["quarantined"]
    quarantined = _table(tmp_path / "out" / "quarantine")
    valid = _table(tmp_path / "out" / "data")
    q_lines = {r["line"] for r in quarantined}
    assert len(q_lines) == len(quarantined) and q_lines <= set(range(1, 1001))
    assert all(r["reason"] in schema.REASONS for r in quarantined)
    assert {r["raw"] for r in quarantined} <= set(lines)
    assert 100 < len(quarantined) < 900 and len({r["reason"] for r in quarantined}) >= 6
    # a valid row's line (from its id, where a byte flip left it intact) is never also in quarantine
    valid_lines = {int(r["id"][4:]) + 1 for r in valid if r["id"].startswith("row-") and r["id"][4:].isdigit()}
    assert len(valid_lines) > 0.9 * len(valid) and not valid_lines & q_lines


def test_conversational_rows_use_the_configured_tokenizer_template(tmp_path: Path) -> None:
    from raydora.models import train_tokenizer

    tok_dir = tmp_path / "tok"
    tok = train_tokenizer([f"hello world {i}" for i in range(200)], tok_dir)
    messages = [{"role": "user", "content": "hi"}]
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    src = tmp_path / "conv.jsonl"
    src.write_text(json.dumps({"prompt": messages, "chosen": [{"role": "assistant", "content": "hello"}],
                               "rejected": [{"role": "assistant", "content": "bye"}]}) + "\n")  # fmt: skip
    validate.validate(src, tmp_path / "out", tokenizer=str(tok_dir))
    (row,) = _table(tmp_path / "out" / "data")
    assert row["prompt"] == expected and expected != schema.default_chat_renderer(messages)
    assert row["responses"] == ["hello", "bye"]


def test_read_canonical_slices_cover_every_row_once(tmp_path: Path) -> None:
    """Row-range read tasks (used to feed actor pools) return each row exactly once, across row groups."""
    folder = tmp_path / "d"
    folder.mkdir()
    pq.write_table(pa.table({"i": list(range(23))}), folder / "a.parquet", row_group_size=5)
    pq.write_table(pa.table({"i": list(range(100, 104))}), folder / "b.parquet")
    ds = data.read_canonical(folder, slice_rows=7, block_rows=3)
    assert sorted(r["i"] for r in ds.take_all()) == list(range(23)) + list(range(100, 104))
    assert ds.materialize().num_blocks() >= 5


def test_stage_writes_keep_the_input_order_when_later_batches_finish_first(tmp_path: Path) -> None:
    # The trainer's plan indexes rows by position, so a stage that wrote rows in the order its actors finished
    # trained the same seed on different batches from run to run (the demo's win rate moved by 0.17).
    class SlowOnSomeBatches:  # defined here: Ray ships it by value (the tests folder is not importable there)
        """An actor-pool stage whose first two batches of every eight take longer: later batches finish first."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            import time

            time.sleep(0.3 if batch.column("id")[0].as_py() % 32 < 8 else 0.0)
            return batch

    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": list(range(64))}), tmp_path / "in" / "rows.parquet")

    def run(write) -> list[int]:
        ds = data.read_canonical(tmp_path / "in", num_cpus=data.IO_CPUS, block_rows=4, slice_rows=8)
        ds = data.map_on_actor_pool(ds, SlowOnSomeBatches, {}, keys=("a", "b"), batch_size=4, actors=2,
                                    actor_cpus=0.5)  # fmt: skip
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        write(ds, out)
        return [i for f in data.parquet_files(out) for i in pq.read_table(f).column("id").to_pylist()]

    # Without order preservation the slow batches land after faster ones (checks that the test can fail) ...
    unordered = run(lambda ds, out: ds.write_parquet(str(out)))
    assert sorted(unordered) == list(range(64)) and unordered != list(range(64))
    # ... and every stage writes through write_rows, which keeps the order.
    assert run(data.write_rows) == list(range(64))


def test_ordered_parquet_sink_writes_a_tasks_blocks_in_order_into_a_file_named_by_the_task(tmp_path: Path) -> None:
    # Ray's parquet sink passes a task's blocks to pyarrow's threaded write_dataset without preserve_order, which
    # swapped two 4-row blocks inside one file in CI; the sink writes blocks one after another instead.
    class Ctx:
        task_idx = 3

    blocks = [pa.table({"id": list(range(a, a + 4)), "x": [None] * 4}) for a in range(0, 64, 4)]
    blocks[5] = pa.table({"id": list(range(20, 24)), "x": ["a", None, "b", None]})  # null type widened to string
    blocks.insert(2, pa.table({"id": pa.array([], pa.int64()), "x": pa.array([], pa.null())}))
    assert data.OrderedParquetSink(tmp_path).write(blocks, Ctx()) == 64
    assert data.OrderedParquetSink(tmp_path).write([blocks[2]], Ctx()) == 0
    (written,) = data.parquet_files(tmp_path)
    assert written.name == "part-000003.parquet" and not list(tmp_path.glob(".*"))
    table = pq.read_table(written)
    assert table.column("id").to_pylist() == list(range(64))
    assert table.column("x").to_pylist()[20:24] == ["a", None, "b", None]
    assert table.schema.field("x").type == pa.string()


# ---- compressed inputs ------------------------------------------------------------------------------------------
def _compress(codec: str, raw: bytes) -> bytes:
    if codec == "zstd":
        out = pa.BufferOutputStream()
        with pa.CompressedOutputStream(out, "zstd") as z:
            z.write(raw)
        return out.getvalue().to_pybytes()
    return {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}[codec](raw)


def test_compressed_files_number_lines_and_keep_raw_bytes_like_plain_ones(tmp_path: Path) -> None:
    """The messy file compressed four ways (one read task each, however small chunk_bytes is), a gzipped JSON
    array and a zstd parquet file: the same reasons on the same lines, the original (decompressed) bytes kept."""
    src = tmp_path / "src"
    src.mkdir()
    names = {"gzip": "m.jsonl.gz", "bz2": "m.jsonl.bz2", "xz": "m.ndjson.xz", "zstd": "m.jsonl.zst"}
    for codec, name in names.items():
        (src / name).write_bytes(_compress(codec, MESSY.read_bytes()))
    (src / "a.json.gz").write_bytes(_compress("gzip", json.dumps(_rows(3)).encode()))
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(_rows(5)), buf, row_group_size=2)
    (src / "b.parquet.zst").write_bytes(_compress("zstd", buf.getvalue().to_pybytes()))
    tasks = inputs.plan_reads(src, chunk_bytes=64)
    assert sorted(Path(t["file"]).name for t in tasks) == sorted([*names.values(), "a.json.gz", "b.parquet.zst"])
    assert {Path(t["file"]).name: t["fallback"] for t in tasks}["m.jsonl.zst"] == "canonical"  # sniffed through zstd
    result = validate.validate(src, tmp_path / "out", chunk_bytes=64)
    assert result.counts == {"input": 4 * 16 + 3 + 5, "valid": 4 * 3 + 3 + 5, "quarantined": 4 * 13}
    raw_lines = MESSY.read_bytes().split(b"\n")
    quarantined = _table(tmp_path / "out" / "quarantine")
    for name in names.values():
        rows = {r["line"]: r for r in quarantined if r["file"] == str((src / name).absolute())}
        assert {line: r["reason"] for line, r in rows.items()} == MESSY_REASONS, name
        assert all(r["raw"] == raw_lines[line - 1] for line, r in rows.items()), name
    valid = _table(tmp_path / "out" / "data")
    assert sorted(r["prompt"] for r in valid if r["prompt"].startswith("p")) == sorted(
        [f"p{i}" for i in range(3)] + [f"p{i}" for i in range(5)]
    )


def test_damaged_compressed_files_end_in_one_corrupt_file_row_and_counts_add_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps(r).encode() for r in _rows(400)]
    whole = _compress("gzip", b"\n".join(lines) + b"\n")
    (src / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download that stopped half way
    (src / "fake.jsonl.xz").write_bytes(b"".join(lines[:3]))  # plain text named .xz
    (src / "cut.parquet.bz2").write_bytes(_compress("bz2", b"PAR1 whatever")[:-5])
    result = validate.validate(src, tmp_path / "out")
    q = {(Path(r["file"]).name, r["reason"]): r for r in _table(tmp_path / "out" / "quarantine")}
    assert set(q) == {("cut.jsonl.gz", "corrupt_file"), ("fake.jsonl.xz", "corrupt_file"),
                      ("cut.parquet.bz2", "corrupt_file")}  # fmt: skip
    read = q[("cut.jsonl.gz", "corrupt_file")]["line"] - 1  # the lines decompressed before the damage
    assert 0 < read < 400 and result.counts == {"input": read + 3, "valid": read, "quarantined": 3}
    assert "cut.jsonl.gz" in q[("cut.jsonl.gz", "corrupt_file")]["detail"]
    assert q[("fake.jsonl.xz", "corrupt_file")]["line"] == 1 and q[("cut.parquet.bz2", "corrupt_file")]["line"] == 1
    ids = sorted(int(r["prompt"][1:]) for r in _table(tmp_path / "out" / "data"))
    assert ids == list(range(read))  # every line before the damage, in order, none invented
    assert json.loads((tmp_path / "out" / "data" / "_SUCCESS").read_text())["reasons"] == {"corrupt_file": 3}
    printed = capsys.readouterr().out
    assert f"[validate] warning: {(src / 'cut.jsonl.gz').absolute()} is damaged" in printed


@pytest.mark.parametrize("codec,suffix", [("gzip", ".gz"), ("zstd", ".zst")])
def test_compressed_jsonl_is_streamed_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str,
                                                     suffix: str) -> None:  # fmt: skip
    """The first records of a 4 MB (decompressed) file cost a few KiB of decompressed reads."""
    src = tmp_path / f"big.jsonl{suffix}"
    src.write_bytes(_compress(codec, b"\n".join(json.dumps(r).encode() for r in _rows(80_000)) + b"\n"))
    consumed = []
    opened = inputs.open_input

    class Counting:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def __getattr__(self, name):
            def call(*args):
                out = getattr(self.f, name)(*args)
                consumed.append(len(out) if isinstance(out, bytes) else 0)
                return out

            return call

    monkeypatch.setattr(inputs, "open_input", lambda path, c=None: Counting(opened(path, c)))
    (task,) = inputs.plan_reads(src, chunk_bytes=1 << 10)
    consumed.clear()  # planning sniffs the first 64 KiB
    records = inputs._records(task)
    first = [next(records) for _ in range(3)]
    assert [r[2]["prompt"] for r in first] == ["p0", "p1", "p2"] and [r[0] for r in first] == [1, 2, 3]
    assert 0 < sum(consumed) < 1 << 10
    assert sum(1 for _ in records) == 80_000 - 3 and sum(consumed) > 4 << 20


def test_list_inputs_knows_compressed_suffixes(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(_compress("gzip", b"{}\n"))
    (tmp_path / "b.PARQUET.ZST").write_bytes(b"")
    assert inputs.list_inputs(tmp_path / "a.jsonl.gz") == [((tmp_path / "a.jsonl.gz").absolute(), "jsonl")]
    assert [k for _, k in inputs.list_inputs(tmp_path)] == ["jsonl", "parquet"]
    assert inputs.compression(tmp_path / "b.PARQUET.ZST") == "zstd" and inputs.compression(MESSY) is None
    (tmp_path / "c.jsonl.lz4").write_bytes(b"")
    with pytest.raises(ValueError, match=r"c\.jsonl\.lz4: unsupported file type"):
        inputs.list_inputs(tmp_path / "c.jsonl.lz4")


# ---- folders ------------------------------------------------------------------------------------------------------
def test_files_a_folder_cannot_read_are_named_never_skipped_silently(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    (src / "logs").mkdir(parents=True)  # a subfolder holding no input at all is no error
    (src / "a.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(2)) + "\n")
    (src / "data.csv").write_text("prompt,chosen,rejected\n")
    (src / "logs" / "notes.txt").write_text("hello\n")
    (src / "_SUCCESS").write_text("{}")  # markers and hidden files stay ignored, silently
    (src / ".DS_Store").write_bytes(b"\0")
    found, skipped = inputs.scan_inputs(src)
    assert [p.name for p, _ in found] == ["a.jsonl"]
    assert skipped == [(src / "data.csv").absolute(), (src / "logs" / "notes.txt").absolute()]
    result = validate.validate(src, tmp_path / "out")
    assert result.counts == {"input": 2, "valid": 2, "quarantined": 0}
    printed = capsys.readouterr().out
    assert f"[validate] warning: skipping 2 file(s) in {src} that are not inputs" in printed
    assert "data.csv, logs/notes.txt" in printed and "_SUCCESS" not in printed and "DS_Store" not in printed
    marker = json.loads((tmp_path / "out" / "data" / "_SUCCESS").read_text())
    assert marker["skipped_files"] == [str(f) for f in skipped]
    assert validate.validate(src, tmp_path / "out").skipped  # an up-to-date rerun says it again
    assert "data.csv, logs/notes.txt" in capsys.readouterr().out


def test_a_folder_without_inputs_lists_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.csv").write_text("a,b\n")
    (tmp_path / "_SUCCESS").write_text("{}")
    with pytest.raises(ValueError, match=r"no input inside .*1 other file\(s\) found:\n  sub/rows\.csv$"):
        inputs.list_inputs(tmp_path)


# ---- nothing valid ------------------------------------------------------------------------------------------------
def test_no_valid_row_is_an_error_that_keeps_the_quarantine(tmp_path: Path) -> None:
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(_rows(1)[0]) + "\n")
    validate.validate(good, out)  # an earlier input's data/, which must not survive a failed validation
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'not json\n{"prompt": "p"}\n{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(validate.NoValidRowsError) as err:
        validate.validate(bad, out)
    message = str(err.value)
    assert message.startswith(f"{bad}: no valid row, all 3 were quarantined (unknown_format: 2, malformed_json: 1)")
    assert f"in {out / 'quarantine'}." in message
    assert not (out / "data").exists()
    assert [(r["file"], r["line"]) for r in _table(out / "quarantine")] == [(str(bad), 1), (str(bad), 2), (str(bad), 3)]
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(validate.NoValidRowsError, match=r"empty\.jsonl: no rows to validate"):
        validate.validate(empty, out)
    assert _table(out / "quarantine") == []  # the quarantine on disk is always the last input's


def test_validate_and_pipeline_commands_exit_1_with_the_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raydora import cli

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a"}\nnot json\n')
    assert cli.main(["validate", "--input", str(bad), "--output", str(tmp_path / "v")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"raydora validate: {bad}: no valid row, all 2 were quarantined (malformed_json: 1, unknown")
    assert (tmp_path / "v" / "quarantine").is_dir() and not (tmp_path / "v" / "data").exists()
    assert cli.main(["pipeline", f"root={tmp_path}", "name=p", f"data.input={bad}"]) == 1
    out = capsys.readouterr()
    assert (
        out.err.startswith(f"raydora pipeline: {bad}: no valid row") and str(tmp_path / "p" / "quarantine") in out.err
    )
    assert "[validate]" not in out.out  # it stopped there: no stage summary, no later stage
    assert cli.main(["validate", "--input", str(tmp_path / "notes.txt"), "--output", str(tmp_path / "v")]) == 1
    assert f"raydora validate: input not found: {tmp_path / 'notes.txt'}" in capsys.readouterr().err


# ---- hf:// inputs ---------------------------------------------------------------------------------------------------
def _cache_hub_dataset(cache: Path, repo: str, splits: dict[str, list[dict]], config: str, revision: str) -> None:
    """Write ``repo`` into the HF datasets cache as a Hub download leaves it: a packaged builder's Arrow files and
    dataset_info.json in ``<cache>/<org>___<name>/<config>/<version>/<revision>/`` (built here from local JSON
    files, since a builder given a repo_id only accepts files from the Hub)."""
    import shutil

    from datasets.packaged_modules.json.json import Json

    org, name = repo.split("/")
    files = cache.parent / f"src-{name}-{config}-{revision}"
    files.mkdir(parents=True)
    for split, rows in splits.items():
        (files / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    builder = Json(cache_dir=str(cache), dataset_name=name, config_name=config, config_id=config, hash=revision,
                   data_files={s: str(files / f"{s}.jsonl") for s in splits})  # fmt: skip
    builder.download_and_prepare()
    shutil.copytree(cache / name, cache / f"{org}___{name}", dirs_exist_ok=True)
    shutil.rmtree(cache / name)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HF datasets cache for this test (datasets reads HF_DATASETS_CACHE once, at import)."""
    import datasets.config

    cache = tmp_path / "hf-cache" / "datasets"
    cache.mkdir(parents=True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_hf_uri_is_found_in_the_local_cache_without_the_network(hub_cache: Path, monkeypatch) -> None:
    import socket

    import datasets.config

    _cache_hub_dataset(hub_cache, "acme/prefs", {"train": _rows(4), "test": _rows(2)}, "default", "rev1")
    _cache_hub_dataset(hub_cache, "acme/multi", {"train": _rows(1)}, "a", "rev1")
    _cache_hub_dataset(hub_cache, "acme/multi", {"train": _rows(2)}, "b", "rev1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if online: hf:// must not try
    where = hub_cache / "acme___prefs" / "default" / "0.0.0" / "rev1"
    assert inputs.hub_arrow_files("hf://acme/prefs") == [(where / "prefs-train.arrow", "train"),
                                                        (where / "prefs-test.arrow", "test")]  # fmt: skip
    assert inputs.hub_arrow_files("hf://acme/prefs@default:test") == [(where / "prefs-test.arrow", "test")]
    assert inputs.hub_arrow_files("hf://acme/multi@b")[0][0].parts[-4] == "b"
    assert datasets.config.HF_HUB_OFFLINE is False  # restored
    tasks = inputs.plan_reads("hf://acme/prefs:train")
    assert [(t["kind"], t["split"], t["fallback"]) for t in tasks] == [("hf", "train", "trl")]
    fp = inputs.input_fingerprints("hf://acme/prefs")
    assert fp[0] == "hf://acme/prefs" and [f[0] for f in fp[1:]] == ["prefs-train.arrow", "prefs-test.arrow"]

    with pytest.raises(inputs.InputError) as missing:
        inputs.hub_arrow_files("hf://acme/other:train")
    assert str(missing.value).startswith(f"hf://acme/other:train: not found in the local HF datasets cache {hub_cache}")
    assert "datasets.load_dataset('acme/other', split='train')" in str(missing.value)
    assert "save_to_disk('FOLDER')" in str(missing.value)
    with pytest.raises(inputs.InputError, match=r"config 'nope'"):
        inputs.hub_arrow_files("hf://acme/prefs@nope")
    with pytest.raises(inputs.InputError, match=r"Unknown split \"dev\""):
        inputs.hub_arrow_files("hf://acme/prefs:dev")
    with pytest.raises(inputs.InputError, match=r"configurations in the cache: .*pick one with hf://acme/multi@CONFIG"):
        inputs.hub_arrow_files("hf://acme/multi")
    for bad in ("hf://acme/prefs:train[:10]", "hf://a/b/c", "hf://acme/prefs@"):
        with pytest.raises(inputs.InputError, match="expected hf://ORG/NAME"):
            inputs.parse_hub(bad)


def test_validate_reads_an_hf_uri_and_redoes_when_the_cache_changes(hub_cache: Path) -> None:
    _cache_hub_dataset(hub_cache, "acme/prefs", {"train": _rows(4), "test": _rows(2)}, "default", "rev1")
    out = hub_cache.parent / "run"
    result = validate.validate("hf://acme/prefs", out)
    assert result.counts == {"input": 6, "valid": 6, "quarantined": 0}
    assert sorted(r["split"] for r in _table(out / "data")) == ["test"] * 2 + ["train"] * 4
    assert validate.validate("hf://acme/prefs", out).skipped
    assert validate.validate("hf://acme/prefs:test", out.parent / "test-only").counts["valid"] == 2
    _cache_hub_dataset(hub_cache, "acme/prefs", {"train": _rows(3)}, "default", "rev2")  # a newer download
    again = validate.validate("hf://acme/prefs", out)
    assert not again.skipped and again.counts["valid"] == 3
