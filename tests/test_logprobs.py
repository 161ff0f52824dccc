"""sequence_logps / token_counts against a log-softmax computed by hand; chunked_target_logps against the full logits."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from raydora.logprobs import chunked_target_logps, sequence_logps, token_counts


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


def _full_target_logps(hidden, weight, targets, bias=None):
    """Today's path: the whole [N, V] logits in the hidden states' dtype, the log-softmax upcast as token_logps."""
    logits = torch.nn.functional.linear(
        hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    )
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_target_logps_equal_the_full_logits_in_value_and_gradient(chunk: int, with_bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    n, d, v = 7, 5, 11
    hidden = torch.randn(n, d, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, dtype=torch.float64, generator=g)
    inputs = [hidden, weight] + ([bias] if with_bias else [])
    got = chunked_target_logps(hidden, weight, targets, bias, chunk_size=chunk)
    want = _full_target_logps(hidden, weight, targets, bias)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    g_got = torch.autograd.grad((got * upstream).sum(), inputs)
    g_want = torch.autograd.grad((want * upstream).sum(), inputs)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_chunked_target_logps_gradcheck_and_double_backward() -> None:
    """WDPO differentiates the embedding gradient again (create_graph): the chunks' backward must be differentiable."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 6, (5,), generator=g)
    fn = lambda h, w, b: chunked_target_logps(h, w, targets, b, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (hidden, weight, bias))

    # The penalty's shape: ||d sum(logp) / d hidden||^2, then its gradient in the weights, chunked == full.
    def penalty_grad(f):
        (gh,) = torch.autograd.grad(f(hidden, weight, bias).sum(), hidden, create_graph=True)
        return torch.autograd.grad(gh.pow(2).sum(), weight)[0]

    torch.testing.assert_close(
        penalty_grad(fn), penalty_grad(lambda h, w, b: _full_target_logps(h, w, targets, b)), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_target_logps_in_fp32_and_bf16_track_the_full_path(dtype: torch.dtype) -> None:
    """fp32: within fp32 rounding. bf16 (the GPU path): the same bf16 logits per chunk, log-softmax in fp32, so the
    values match the full path's; the result is float32 either way."""
    g = torch.Generator().manual_seed(2)
    n, d, v = 33, 16, 257
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_(True)
    weight = (0.3 * torch.randn(v, d, generator=g)).requires_grad_(True)  # fp32 master weights
    targets = torch.randint(0, v, (n,), generator=g)
    got = chunked_target_logps(hidden, weight, targets, chunk_size=8)
    want = _full_target_logps(hidden, weight, targets)
    assert got.dtype == torch.float32
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-6}[dtype]  # bf16: bitwise the same logits, fp32 reductions
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    gw_got = torch.autograd.grad(got.sum(), weight)[0]
    gw_want = torch.autograd.grad(want.sum(), weight)[0]
    assert gw_got.dtype == weight.dtype
    torch.testing.assert_close(gw_got, gw_want, atol=1e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)


def test_chunked_target_logps_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="hidden \\[N, D\\]"):
        chunked_target_logps(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_target_logps(torch.zeros(2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("create_graph", [False, True])
def test_chunked_target_logps_skip_a_frozen_heads_gradient(create_graph: bool) -> None:
    """A frozen head (LoRA's base): the backward skips the weight and bias gradients; the hidden states' gradient
    is the full path's, with and without create_graph."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.float64, generator=g)
    bias = torch.randn(6, dtype=torch.float64, generator=g)
    targets = torch.randint(0, 6, (9,), generator=g)
    got = chunked_target_logps(hidden, weight, targets, bias, chunk_size=4)
    (gh,) = torch.autograd.grad(got.sum(), hidden, create_graph=create_graph)
    (want,) = torch.autograd.grad(_full_target_logps(hidden, weight, targets, bias).sum(), hidden)
    torch.testing.assert_close(gh, want, atol=1e-12, rtol=0)
    assert weight.grad is None and bias.grad is None
    if create_graph:  # the penalty's gradient in the hidden states still flows (WDPO under LoRA)
        (g2,) = torch.autograd.grad(gh.pow(2).sum(), hidden)
        assert g2.abs().sum() > 0


@pytest.mark.parametrize("create_graph", [False, True])
def test_chunked_backward_under_autocast_recomputes_the_forwards_logits(create_graph: bool) -> None:
    """Under bf16 autocast the forward's logits (and its logsumexp) are bf16 logits upcast; the backward runs
    outside autocast and must recompute those same logits, or its softmax no longer sums to one. A shift of every
    bias by one constant leaves every log-prob unchanged, so the bias gradient sums to zero exactly when it does."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 24, generator=g, requires_grad=True)
    weight = torch.randn(500, 24, generator=g, requires_grad=True)
    bias = torch.randn(500, generator=g, requires_grad=True)
    targets = torch.randint(0, 500, (37,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = chunked_target_logps(hidden, weight, targets, bias, chunk_size=8)
    (grad_b,) = torch.autograd.grad(logps.sum(), bias, create_graph=create_graph)
    # fp32 rounding: ~1e-6 here; 2.8e-3 when the backward recomputed the logits in fp32 against the bf16 logsumexp
    assert abs(float(grad_b.detach().sum())) < 1e-4
