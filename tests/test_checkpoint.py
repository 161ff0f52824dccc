"""Checkpoint folders: the manifest written last, verification, and resume falling back past a broken newest one
(no Ray: the folders are written by ``checkpoint.save_checkpoint`` itself and broken from the outside)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from raydora import checkpoint
from raydora.models import build_model, train_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Real checkpoints of a tiny GPT-2 at steps 3, 6 and 9, laid out as Ray Train stores them."""
    tok = train_tokenizer(iter(["the quick brown fox jumps over the lazy dog"] * 20), vocab_size=300)
    model = build_model("tiny-gpt2", tok, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    root = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    out = {}
    for step in (3, 6, 9):
        tmp = checkpoint.save_checkpoint(model, optimizer, scheduler, tok, step, lora=False, rank=0)
        assert tmp is not None
        out[step] = Path(shutil.move(tmp, root / f"checkpoint_2026-12-03_10-00-0{step}.000000"))
    return out


def _copy(saved: dict[int, Path], tmp_path: Path) -> Path:
    """A run folder holding copies of the three checkpoints."""
    for folder in saved.values():
        shutil.copytree(folder, tmp_path / "checkpoints" / folder.name)
    return tmp_path


def test_the_manifest_lists_every_file_with_its_size(saved: dict[int, Path]) -> None:
    folder = saved[6]
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    assert manifest["step"] == 6
    files = {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()} - {checkpoint.MANIFEST}
    assert set(manifest["files"]) == files and {"state.pt", "step.json", "model/model.safetensors"} <= files
    assert all(manifest["files"][f] == (folder / f).stat().st_size for f in files)
    assert checkpoint.verify(folder) is None


@pytest.mark.parametrize("damage", ["truncate", "delete", "manifest"])
def test_verify_names_what_is_broken(saved: dict[int, Path], tmp_path: Path, damage: str) -> None:
    folder = Path(shutil.copytree(saved[3], tmp_path / "c"))
    weights = folder / "model" / "model.safetensors"
    size = weights.stat().st_size
    if damage == "truncate":  # a copy cut short
        with weights.open("r+b") as f:
            f.truncate(size // 2)
        assert checkpoint.verify(folder) == f"model/model.safetensors has {size // 2} bytes, the manifest says {size}"
    elif damage == "delete":
        (folder / "state.pt").unlink()
        assert checkpoint.verify(folder) == "state.pt is missing"
    else:
        (folder / checkpoint.MANIFEST).write_text("{not json")
        assert (checkpoint.verify(folder) or "").startswith("unreadable manifest.json")


def test_a_folder_from_before_manifests_is_checked_for_its_files(saved: dict[int, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(saved[3], tmp_path / "old"))
    (folder / checkpoint.MANIFEST).unlink()
    assert checkpoint.verify(folder) is None
    shutil.rmtree(folder / "model")
    assert checkpoint.verify(folder) == "no manifest.json, and state.pt or the weights are missing"


def test_resume_passes_over_broken_newer_checkpoints_and_says_so(
    saved: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(saved, tmp_path)
    folders = {s: run / "checkpoints" / f.name for s, f in saved.items()}
    assert checkpoint.latest_checkpoint(run) == (9, folders[9])
    (folders[9] / "state.pt").write_bytes(b"")  # the newest: half written
    (folders[6] / "model" / "model.safetensors").unlink()  # the next: a file lost
    assert checkpoint.latest_checkpoint(run, say=True) == (3, folders[3])
    said = capsys.readouterr().out.splitlines()
    assert said == [
        f"[checkpoint] skipping step 9 ({folders[9]}): state.pt has 0 bytes, the manifest says "
        f"{(saved[9] / 'state.pt').stat().st_size}; trying the previous one",
        f"[checkpoint] skipping step 6 ({folders[6]}): model/model.safetensors is missing; trying the previous one",
    ]
    (folders[3] / checkpoint.MANIFEST).write_text("[]")
    assert checkpoint.latest_checkpoint(run) == (0, None)  # nothing whole left: a fresh start


def test_a_worker_restores_ray_trains_checkpoint_only_when_whole_and_not_older_than_the_plan(
    saved: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(saved, tmp_path)
    c3, c6, c9 = (run / "checkpoints" / saved[s].name for s in (3, 6, 9))
    # After a worker failure: Ray's newest (step 9) is newer than where the driver planned the data (6): restored.
    assert checkpoint.pick_resume(c9, str(c6), 6) == c9
    assert checkpoint.pick_resume(None, str(c6), 6) == c6  # a rerun without Ray's snapshot
    assert checkpoint.pick_resume(None, None, 0) is None  # a fresh run
    # Ray's snapshot kept step 3, but the driver found step 6 whole: the data starts at 6, so 6 is restored.
    assert checkpoint.pick_resume(c3, str(c6), 6) == c6
    assert "step 3 is older than step 6" in capsys.readouterr().out
    (c9 / "state.pt").write_bytes(b"x")  # Ray's checkpoint broken since it was reported
    assert checkpoint.pick_resume(c9, str(c6), 6) == c6
    assert "state.pt has 1 bytes" in capsys.readouterr().out
