"""`raydora synth` followed by `raydora validate`, as a user runs them (separate processes, each with its own
local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _raydora(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "raydora.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_synth_then_validate(tmp_path: Path) -> None:
    synth = _raydora("synth", "--output", str(tmp_path / "bench"), "--rows", "120", "--seed", "3", "--k", "2",
                     "ray.num_cpus=2", "synth.eval_rows=10")  # fmt: skip
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert "[synth] done: train=120" in synth.stdout
    (tmp_path / "bench" / "train" / "extra.jsonl").write_text('{"prompt": "p", "chosen": "a"}\nnot json\n')
    checked = _raydora("validate", "--input", str(tmp_path / "bench" / "train"), "--output", str(tmp_path / "run"),
                       "ray.num_cpus=2")  # fmt: skip
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "[validate] done: input=122, valid=120, quarantined=2" in checked.stdout
    assert "malformed_json" in checked.stdout and "unknown_format" in checked.stdout  # the file fits no layout
    marker = json.loads((tmp_path / "run" / "data" / "_SUCCESS").read_text())
    assert marker["rows"] == {"input": 122, "valid": 120, "quarantined": 2}


def test_validate_without_input_is_a_clear_error(tmp_path: Path) -> None:
    out = _raydora("validate", "--output", str(tmp_path))
    assert out.returncode == 2 and "--input" in out.stderr


def test_missing_input_names_the_path(tmp_path: Path) -> None:
    out = _raydora("validate", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path), "ray.num_cpus=1")
    assert out.returncode != 0 and "nope.jsonl" in out.stderr
