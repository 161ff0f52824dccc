"""GPU tier: the same math on CUDA (bf16 log-probs, objectives) equals the CPU result. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from raydora import hardware, robust
from raydora.logprobs import sequence_logps

pytestmark = pytest.mark.gpu


def test_objectives_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(64, generator=g, dtype=torch.float64) * 3, torch.rand(64, generator=g, dtype=torch.float64)
    for fn in (lambda a, b: robust.dora(a, b, 0.5), lambda a, b: robust.kldpo(a, 0.3), lambda a, b: robust.kl_dro(a)):
        torch.testing.assert_close(fn(x.cuda(), w.cuda()).cpu(), fn(x, w))


def test_bf16_logits_give_fp32_logps_on_cuda() -> None:
    assert hardware.resolve_precision("auto", "cuda") == torch.bfloat16
    logits = torch.randn(2, 9, 50, device="cuda")
    labels = torch.randint(0, 50, (2, 9), device="cuda")
    mask = torch.ones(2, 9, dtype=torch.long, device="cuda")
    out = sequence_logps(logits.bfloat16(), labels, mask)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), sequence_logps(logits.cpu(), labels.cpu(), mask.cpu()), atol=0.2, rtol=0.02)
