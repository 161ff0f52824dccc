"""The raydora command and the precision rule (bf16 only where native)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from raydora import cli, hardware

NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f\n"
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
AMX = "processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_bf16\n"


def test_precision_follows_the_cpu() -> None:
    assert hardware.resolve_precision("auto", "cpu", NO_BF16) == torch.float32
    assert hardware.resolve_precision("auto", "cpu", AVX512_BF16) == torch.bfloat16
    assert hardware.resolve_precision("auto", "cpu", AMX) == torch.bfloat16
    assert hardware.resolve_precision("fp32", "cpu", AMX) == torch.float32
    with pytest.raises(ValueError, match="no native bf16"):
        hardware.resolve_precision("bf16", "cpu", NO_BF16)


def test_precision_on_cuda_needs_a_gpu() -> None:
    expected = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    assert hardware.resolve_precision("auto", "cuda") == expected


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "check" in out and "config" in out


def test_config_command_prints_overridden_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "train.objective=kl_dro", "train.lam=0.25"]) == 0
    out = capsys.readouterr().out
    assert "objective: kl_dro" in out and "lam: 0.25" in out


def test_config_error_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "train.lamda=1"]) == 2
    assert "train.lamda: unknown key" in capsys.readouterr().err


def test_check_command_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["check", "model.precision=fp32"]) == 0
    out = capsys.readouterr().out
    assert "self-check passed" in out and "precision float32" in out


def test_console_script_is_installed() -> None:
    """The `raydora` entry point exists in the environment (make install puts it on PATH)."""
    result = subprocess.run([sys.executable, "-m", "raydora.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "raydora 0.1.0" in result.stdout


def test_every_stage_takes_force_and_its_command_passes_it(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The pipeline's Stage contract, ``(cfg, run_dir, force=False)``, holds for every stage (synth and classify
    took no ``force``, and ``raydora classify --force`` was refused), and each command hands ``--force`` on."""
    import inspect

    from raydora import classify, cluster, pipeline

    for name, stage in pipeline.STAGES.items():
        params = inspect.signature(stage).parameters
        assert "force" in params and params["force"].default is False, name
    seen: list[bool] = []

    class Result:
        def summary(self) -> str:
            return "classify: done"

    monkeypatch.setattr(cluster, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(classify, "run", lambda cfg, run_dir, force=False: seen.append(force) or Result())
    assert cli.main(["classify", f"root={tmp_path}", "--force"]) == 0
    assert cli.main(["classify", f"root={tmp_path}"]) == 0
    assert seen == [True, False]
    # The other stage commands go through raydora.run_stage: the config written, force handed on.
    from raydora.rundir import StageResult

    done = StageResult("train", {"final": "f"}, {"rows": 1})
    monkeypatch.setitem(pipeline.STAGES, "train", lambda cfg, run_dir, force=False: seen.append(force) or done)
    assert cli.main(["train", f"root={tmp_path}", "name=t", "--force"]) == 0
    assert seen == [True, False, True] and (tmp_path / "t" / "config.yaml").is_file()
