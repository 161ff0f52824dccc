"""sequence_logps / token_counts against a log-softmax computed by hand."""

from __future__ import annotations

import math

import torch
from torch.autograd import gradcheck

from raydora.logprobs import sequence_logps, token_counts


def test_sequence_logps_by_hand() -> None:
    """V = 2, T = 3. Uniform logits give log(1/2) per counted token. The mask [0, 1, 1] counts labels at t = 1, 2,
    scored by logits at t = 0, 1 (the shift): -2 log 2 = -1.38629436. Row 1 puts logits [ln 3, 0] at t = 0
    (p(label 0) = 3/4) and counts only t = 1: log(3/4) = -0.28768207. Masked labels may be -100."""
    logits = torch.zeros(2, 3, 2)
    logits[1, 0] = torch.tensor([math.log(3), 0.0])
    labels = torch.tensor([[-100, 1, 0], [-100, 0, -100]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    out = sequence_logps(logits, labels, mask)
    torch.testing.assert_close(out, torch.tensor([-2 * math.log(2), math.log(0.75)]))
    assert token_counts(mask).tolist() == [2, 1]


def test_sequence_logps_matches_log_softmax_and_upcasts_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    mask = (torch.rand(3, 7, generator=g) > 0.3).long()
    ref = (logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)
    torch.testing.assert_close(sequence_logps(logits, labels, mask), ref)
    out_bf16 = sequence_logps(logits.bfloat16(), labels, mask)
    assert out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, ref, atol=0.1, rtol=0.02)


def test_masked_minus_inf_logit_does_not_poison_the_sum() -> None:
    logits = torch.zeros(1, 3, 2)
    logits[0, 1] = torch.tensor([float("-inf"), 0.0])  # label 0 at t = 2 is impossible, but it is masked out
    out = sequence_logps(logits, torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 0]]))
    torch.testing.assert_close(out, torch.tensor([-math.log(2)]))


def test_sequence_logps_gradcheck() -> None:
    logits = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]])
    assert gradcheck(lambda x: sequence_logps(x, labels, mask), (logits,))
