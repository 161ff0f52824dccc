"""WDPO's penalty on a real (tiny) transformers model, in float64: the per-sample squared gradient norm over the
input embeddings matches central finite differences, and its second-order term reaches the parameters."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from raydora import losses, robust
from raydora.logprobs import sequence_logps

B, T, V = 2, 4, 13


@pytest.fixture(scope="module")
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=V, n_positions=8, n_embd=8, n_layer=1, n_head=2, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg).double().eval()


def _dpo_losses(model: GPT2LMHeadModel, z: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows [0, B) are chosen, [B, 2B) rejected (TRL's concatenated layout); flat reference log-probs."""
    logps = sequence_logps(model(inputs_embeds=z).logits, ids, mask)
    zeros = torch.zeros(B, dtype=torch.float64)
    return losses.dpo(logps[:B], logps[B:], zeros, zeros, beta=0.5)


def _inputs(model: GPT2LMHeadModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2 * B, T), generator=g)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]] * 2)
    z = model.transformer.wte(ids).detach().requires_grad_(True)
    return z, ids, mask


def test_penalty_matches_finite_differences(tiny_gpt2: GPT2LMHeadModel) -> None:
    z, ids, mask = _inputs(tiny_gpt2)
    penalty = robust.wdpo_penalty(_dpo_losses(tiny_gpt2, z, ids, mask), z)
    # Central differences of each sample's loss w.r.t. every embedding coordinate.
    h, fd = 1e-6, torch.zeros(B, *z.shape, dtype=torch.float64)
    with torch.no_grad():
        for idx in range(z.numel()):
            e = torch.zeros(z.numel(), dtype=torch.float64)
            e[idx] = h
            e = e.reshape(z.shape)
            fd.view(B, -1)[:, idx] = (
                _dpo_losses(tiny_gpt2, z + e, ids, mask) - _dpo_losses(tiny_gpt2, z - e, ids, mask)
            ) / (2 * h)
    expected = fd.pow(2).flatten(1).sum(1)
    assert expected.min() > 1e-6
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-6, atol=1e-12)
    # Sample i's loss depends only on rows i and i + B: the other rows' finite differences vanish.
    assert fd[0, 1].abs().max() < 1e-9 and fd[0, B + 1].abs().max() < 1e-9


def test_penalty_second_order_term_reaches_parameters(tiny_gpt2: GPT2LMHeadModel) -> None:
    """d/dtheta of sum_i penalty_i through create_graph equals a finite difference in one parameter."""
    z, ids, mask = _inputs(tiny_gpt2)
    param = tiny_gpt2.transformer.h[0].mlp.c_fc.weight

    def total_penalty() -> torch.Tensor:
        zz = z.detach().requires_grad_(True)
        return robust.wdpo_penalty(_dpo_losses(tiny_gpt2, zz, ids, mask), zz).sum()

    (grad,) = torch.autograd.grad(total_penalty(), param)
    assert grad.abs().max() > 1e-8, "the penalty's gradient did not reach the parameters"
    h = 1e-6
    with torch.no_grad():
        param[0, 0] += h
    plus = total_penalty().detach()
    with torch.no_grad():
        param[0, 0] -= 2 * h
    minus = total_penalty().detach()
    with torch.no_grad():
        param[0, 0] += h
    torch.testing.assert_close(grad[0, 0], (plus - minus) / (2 * h), rtol=1e-5, atol=1e-10)


def test_penalty_accepts_separate_chosen_and_rejected_embeddings(tiny_gpt2: GPT2LMHeadModel) -> None:
    z, ids, mask = _inputs(tiny_gpt2)
    zc, zr = z[:B].detach().requires_grad_(True), z[B:].detach().requires_grad_(True)
    split = robust.wdpo_penalty(_dpo_losses(tiny_gpt2, torch.cat([zc, zr]), ids, mask), [zc, zr])
    joint = robust.wdpo_penalty(_dpo_losses(tiny_gpt2, z, ids, mask), z)
    torch.testing.assert_close(split, joint)


def test_penalty_errors() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="not a multiple"):
        robust.wdpo_penalty((x**2).sum(1)[:2], x)
    with pytest.raises(ValueError, match="grad-carrying"):
        robust.wdpo_penalty((x**2).sum(1), x.detach())
