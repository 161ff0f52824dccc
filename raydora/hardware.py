"""Device and precision choices that follow the hardware: bf16 only where it is native."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (empty where it cannot be read, e.g. macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_native(device: str, cpuinfo: str | None = None) -> bool:
    """True where bf16 matmuls run natively: CUDA devices that support it, CPUs with AMX or AVX512-BF16."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(flag in cpu_flags(cpuinfo) for flag in BF16_CPU_FLAGS)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def autocast(device_type: str, dtype: torch.dtype) -> torch.autocast:
    """Autocast to ``dtype`` on ``device_type`` (``cuda`` or ``cpu``); disabled for fp32."""
    return torch.autocast(device_type, dtype, enabled=dtype != torch.float32)


def resolve_precision(requested: str, device: str, cpuinfo: str | None = None) -> torch.dtype:
    """``auto`` -> bf16 where native, else fp32. An explicit ``bf16`` on hardware without it is an error: emulated
    bf16 is many times slower than fp32 (about 20x on a plain x86 CPU) and gains nothing."""
    native = bf16_native(device, cpuinfo)
    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        if not native:
            raise ValueError(
                f"precision=bf16 was requested but {device} has no native bf16 "
                f"(CUDA with bf16, or a CPU with {' / '.join(BF16_CPU_FLAGS)}); use precision=auto or fp32"
            )
        return torch.bfloat16
    if requested == "auto":
        return torch.bfloat16 if native else torch.float32
    raise ValueError(f"precision must be auto, fp32 or bf16, got {requested!r}")
