"""`raydora synth` followed by `raydora validate`, as a user runs them (separate processes: the first starts its
own local Ray, the second joins a running one by ``ray.address``, as on a cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _raydora(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "raydora.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_synth_then_validate(tmp_path: Path, ray_session) -> None:
    synth = _raydora("synth", "--output", str(tmp_path / "bench"), "--rows", "120", "--seed", "3", "--k", "2",
                     "ray.num_cpus=2", "synth.eval_rows=10")  # fmt: skip
    assert synth.returncode == 0, synth.stderr[-2000:]
    assert "[synth] done: train=120" in synth.stdout
    (tmp_path / "bench" / "train" / "extra.jsonl").write_text('{"prompt": "p", "chosen": "a"}\nnot json\n')
    address = ray_session.get_runtime_context().gcs_address  # this session's Ray: no second local start-up
    checked = _raydora("validate", "--input", str(tmp_path / "bench" / "train"), "--output", str(tmp_path / "run"),
                       f"ray.address={address}")  # fmt: skip
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert "[validate] done: input=122, valid=120, quarantined=2" in checked.stdout
    assert "malformed_json" in checked.stdout and "unknown_format" in checked.stdout  # the file fits no layout
    marker = json.loads((tmp_path / "run" / "data" / "_SUCCESS").read_text())
    assert marker["rows"] == {"input": 122, "valid": 120, "quarantined": 2}


def test_validate_without_input_is_a_clear_error(tmp_path: Path) -> None:
    out = _raydora("validate", "--output", str(tmp_path))
    assert out.returncode == 2 and "--input" in out.stderr


def test_missing_input_names_the_path_before_starting_ray(tmp_path: Path) -> None:
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)
    for missing in (tmp_path / "nope.jsonl", tmp_path / "ray"):  # a missing file; a folder without inputs
        out = _raydora("validate", "--input", str(missing), "--output", str(tmp_path / "run"), "ray.num_cpus=1",
                       env=env)  # fmt: skip
        assert out.returncode == 1 and "raydora validate: " in out.stderr and str(missing) in out.stderr
        assert "Traceback" not in out.stderr
    assert not any(ray_tmp.iterdir())  # no local Ray was started for an input that cannot be read
