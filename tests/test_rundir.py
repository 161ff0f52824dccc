"""The run directory's contract: a ``_SUCCESS`` marker vouches for the files it lists, and a finished stage whose
outputs were later deleted, truncated or overwritten is redone instead of skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydora import rundir
from raydora.rundir import SUCCESS, is_done, promote, read_success, staging, write_success


def _stage_folder(folder: Path) -> Path:
    """A finished-looking stage folder: a parquet shard in a subfolder, a small JSON file."""
    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"x": list(range(1000)), "s": [f"row {i}" for i in range(1000)]}),
                   folder / "data" / "part-0.parquet")  # fmt: skip
    (folder / "meta.json").write_text(json.dumps({"temperature": 1.25}))
    write_success(folder, {"stage": "demo", "fingerprint": "fp1"})
    return folder


def test_marker_records_a_manifest_of_sizes(tmp_path: Path) -> None:
    folder = _stage_folder(tmp_path / "out")
    (folder / ".part-1.parquet.tmp").write_bytes(b"half")  # after the marker: not listed, and harmless
    marker = read_success(folder) or {}
    assert marker["manifest"] == {
        "data/part-0.parquet": (folder / "data" / "part-0.parquet").stat().st_size,
        "meta.json": (folder / "meta.json").stat().st_size,
    }
    assert set(marker["digests"]) == {"data/part-0.parquet", "meta.json"}  # both under 1 MiB: hashed too
    assert is_done(folder, "fp1") and not is_done(folder, "other")


def test_truncated_file_is_named_and_redone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stage_folder(tmp_path / "out")
    part = folder / "data" / "part-0.parquet"
    size = part.stat().st_size
    part.write_bytes(part.read_bytes()[: size // 2])
    assert not is_done(folder, "fp1")
    line = capsys.readouterr().out.strip()
    assert line == f"[demo] out/data/part-0.parquet changed size ({size} -> {size // 2}): redoing"


def test_deleted_file_is_redone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stage_folder(tmp_path / "out")
    (folder / "meta.json").unlink()
    assert not is_done(folder, "fp1")
    assert "out/meta.json is missing: redoing" in capsys.readouterr().out


def test_same_size_overwrite_of_a_small_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stage_folder(tmp_path / "out")
    meta = folder / "meta.json"
    edited = meta.read_text().replace("1.25", "1.75")
    assert len(edited) == meta.stat().st_size
    meta.write_text(edited)
    assert not is_done(folder, "fp1")
    assert "out/meta.json changed content" in capsys.readouterr().out


def test_large_files_are_only_stated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rundir, "HASH_BELOW", 64)  # the parquet shard now counts as large
    folder = _stage_folder(tmp_path / "out")
    assert set((read_success(folder) or {})["digests"]) == {"meta.json"}
    part = folder / "data" / "part-0.parquet"
    part.write_bytes(bytes(part.stat().st_size))  # same size, other bytes: a stat cannot tell
    assert is_done(folder, "fp1")


def test_several_problems_are_counted_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stage_folder(tmp_path / "out")
    (folder / "meta.json").unlink()
    (folder / "data" / "part-0.parquet").write_bytes(b"")
    assert not is_done(folder, "fp1")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "1 more file(s) differ: redoing" in out


def test_hidden_temp_files_and_extra_files_do_not_matter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _stage_folder(tmp_path / "out")
    (folder / ".tmp-write-123").write_bytes(b"x" * 10)
    (folder / ".staging").mkdir()
    (folder / ".staging" / "junk").write_text("junk")
    (folder / "data" / "notes.txt").write_text("added later")
    assert is_done(folder, "fp1")
    assert capsys.readouterr().out == ""


def test_excluded_folders_may_change_after_the_marker(tmp_path: Path) -> None:
    folder = tmp_path / "train"
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "model.safetensors").write_bytes(b"w" * 100)
    (folder / "checkpoints" / "step_1").mkdir(parents=True)
    (folder / "checkpoints" / "step_1" / "state.pt").write_bytes(b"s" * 50)
    write_success(folder, {"stage": "train", "fingerprint": "fp"}, exclude=("checkpoints", "tensorboard"))
    assert list((read_success(folder) or {})["manifest"]) == ["final/model.safetensors"]
    (folder / "checkpoints" / "step_1" / "state.pt").unlink()  # Ray Train pruning an old checkpoint
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events").write_text("e")
    assert is_done(folder, "fp")
    (folder / "final" / "model.safetensors").write_bytes(b"w" * 10)
    assert not is_done(folder, "fp")


def test_manifest_survives_promote(tmp_path: Path) -> None:
    with staging(tmp_path, "out") as tmp:
        _stage_folder(tmp / "out")
        promote(tmp / "out", tmp_path / "out")
    assert is_done(tmp_path / "out", "fp1")
    (tmp_path / "out").rename(tmp_path / "moved")  # a run directory moved elsewhere
    assert is_done(tmp_path / "moved", "fp1")


def test_old_marker_without_manifest_is_fingerprint_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"PAR1 whatever")
    (folder / SUCCESS).write_text(json.dumps({"stage": "demo", "fingerprint": "fp1", "finished_at": "then"}))
    assert is_done(folder, "fp1") and not is_done(folder, "fp2")
    (folder / "part-0.parquet").unlink()  # not listed anywhere: cannot be noticed
    assert is_done(folder, "fp1")
    assert capsys.readouterr().out == ""


def test_on_corrupt_is_called_only_for_a_corrupted_output(tmp_path: Path) -> None:
    folder = _stage_folder(tmp_path / "out")
    called: list[Path] = []
    assert is_done(folder, "fp1", on_corrupt=called.append) and not called
    assert not is_done(folder, "other", on_corrupt=called.append) and not called  # stale, not corrupted
    (folder / "meta.json").unlink()
    assert not is_done(folder, "fp1", on_corrupt=called.append)
    assert called == [folder]


@pytest.mark.usefixtures("ray_session")
def test_corrupted_stage_output_is_redone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """synth + validate through their pipeline entry points: skipped when up to date, redone when a parquet
    shard of data/ was truncated after its marker, and a corrupted synth split is redone too."""
    from raydora import synth, validate
    from raydora.config import load_config

    cfg = load_config(None, ["name=x", f"root={tmp_path}", "synth.rows=40", "synth.eval_rows=5", "synth.k=2"])
    run_dir = cfg.run_dir
    assert not synth.run(cfg, run_dir).skipped
    first = validate.run(cfg, run_dir)
    assert not first.skipped and first.counts["valid"] == 40
    assert synth.run(cfg, run_dir).skipped and validate.run(cfg, run_dir).skipped

    def rows(folder: Path) -> int:
        return sum(pq.read_metadata(f).num_rows for f in sorted(folder.glob("*.parquet")))

    shard = max((run_dir / "data").glob("*.parquet"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(shard)
    capsys.readouterr()
    again = validate.run(cfg, run_dir)
    assert not again.skipped and again.counts == first.counts
    assert f"[validate] data/{shard.name} changed size" in capsys.readouterr().out
    assert rows(run_dir / "data") == 40
    assert sum(pq.read_table(f).num_rows for f in (run_dir / "data").glob("*.parquet")) == 40  # all readable
    assert validate.run(cfg, run_dir).skipped

    split = sorted((run_dir / "synth" / "train").glob("*.json"))[0]
    split.write_text("")
    assert not synth.run(cfg, run_dir).skipped
    lines = sum(len(f.read_text().splitlines()) for f in (run_dir / "synth" / "train").glob("*.json"))
    assert lines == 40
    assert synth.run(cfg, run_dir).skipped
