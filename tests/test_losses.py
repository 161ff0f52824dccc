"""Per-sample losses against hand-computed values (the arithmetic is in each docstring), plus gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from raydora import losses as L

T = torch.tensor
# Three pairs (torchtune-style): the reference is flat, so h = pc - pr = [2, 0, -2].
PC, PR = T([-1.0, -2.0, -3.0]), T([-3.0, -2.0, -1.0])
RC, RR = T([-2.0, -2.0, -2.0]), T([-2.0, -2.0, -2.0])
SP_E = math.log(1 + math.e)  # softplus(1) = 1.31326169
SP_INV_E = math.log(1 + 1 / math.e)  # softplus(-1) = 0.31326169


def test_dpo_by_hand() -> None:
    """beta = 0.5, beta*h = [1, 0, -1]; -log sigmoid(x) = log(1 + e^-x) = [0.31326169, log 2, 1.31326169]."""
    out = L.dpo(PC, PR, RC, RR, beta=0.5)
    torch.testing.assert_close(out, T([SP_INV_E, math.log(2), SP_E]))
    assert out.shape == (3,)


def test_ipo_by_hand() -> None:
    """beta = 0.5, 1/(2 beta) = 1: (h - 1)^2 = [1, 1, 9]."""
    torch.testing.assert_close(L.ipo(PC, PR, RC, RR, beta=0.5), T([1.0, 1.0, 9.0]))


def test_cdpo_by_hand() -> None:
    """eps = 0.25: 0.75 * [0.31326, 0.69315, 1.31326] + 0.25 * [1.31326, 0.69315, 0.31326]
    = [0.23495 + 0.32832, 0.69315, 0.98495 + 0.07832] = [0.56326169, 0.69314718, 1.06326169]."""
    out = L.cdpo(PC, PR, RC, RR, beta=0.5, label_smoothing=0.25)
    torch.testing.assert_close(out, T([0.56326169, 0.69314718, 1.06326169]))
    torch.testing.assert_close(L.cdpo(PC, PR, RC, RR, 0.5, 0.0), L.dpo(PC, PR, RC, RR, 0.5))


def test_rdpo_by_hand() -> None:
    """eps = 0.25: [(0.75 l(w,l) - 0.25 l(l,w)] / 0.5. Since l(w,l) - l(l,w) = -beta h, this is
    l(w,l) - eps/(1-2eps) * beta h = [0.31326 - 0.5, 0.69315, 1.31326 + 0.5] = [-0.18673831, 0.69314718, 1.81326169]."""
    out = L.rdpo(PC, PR, RC, RR, beta=0.5, flip_rate=0.25)
    torch.testing.assert_close(out, T([-0.18673831, 0.69314718, 1.81326169]))
    with pytest.raises(ValueError, match="flip_rate"):
        L.rdpo(PC, PR, RC, RR, flip_rate=0.5)


def test_simpo_by_hand() -> None:
    """beta = 2, gamma = 1, lengths 2/3 and 2/2:
    row 0: 2 * (-4/2) - 2 * (-6/3) - 1 = -1 -> log(1 + e) = 1.31326169;
    row 1: 2 * (-2/2) - 2 * (-4/2) - 1 = 1 -> log(1 + 1/e) = 0.31326169."""
    out = L.simpo(T([-4.0, -2.0]), T([-6.0, -4.0]), T([2, 2]), T([3, 2]), beta=2.0, gamma=1.0)
    torch.testing.assert_close(out, T([SP_E, SP_INV_E]))


def test_dpo_pl_by_hand() -> None:
    """beta = 1, r = [1, 0, 2], scores [0.5, 0.9, 0.1] -> ranked r = [0, 1, 2]:
    k=1: 0 - log(1 + e + e^2) = -2.40760596; k=2: 1 - log(e + e^2) = -1.31326169; k=3: 2 - 2 = 0.
    loss = (2.40760596 + 1.31326169) / 3 = 1.24028922."""
    out = L.dpo_pl(T([[1.0, 0.0, 2.0]]), T([[0.0, 0.0, 0.0]]), T([[0.5, 0.9, 0.1]]), beta=1.0)
    torch.testing.assert_close(out, T([1.24028922]))


def test_dpo_pl_pairwise_is_half_dpo() -> None:
    """For K = 2: -(1/2)[(r_w - log(e^r_w + e^r_l)) + 0] = DPO / 2."""
    pl = L.dpo_pl(torch.stack([PC, PR], 1), torch.stack([RC, RR], 1), T([[1.0, 0.0]] * 3), beta=0.5)
    torch.testing.assert_close(pl, L.dpo(PC, PR, RC, RR, 0.5) / 2)


def test_rrhf_by_hand() -> None:
    """Row 0: s = [-2/2, -6/3, -3/1] = [-1, -2, -3], scores [0.1, 0.5, 0.9] rank the *worst* s highest:
    pairs (0<1): max(0, -1+2) = 1; (0<2): -1+3 = 2; (1<2): -2+3 = 1 -> 4 (mean over K: 4/3).
    Row 1: same s, scores [0.9, 0.5, 0.1] agree with s -> every hinge is 0."""
    logps, lengths = T([[-2.0, -6.0, -3.0]] * 2), T([[2.0, 3.0, 1.0]] * 2)
    scores = T([[0.1, 0.5, 0.9], [0.9, 0.5, 0.1]])
    torch.testing.assert_close(L.rrhf(logps, lengths, scores), T([4.0, 0.0]))
    torch.testing.assert_close(L.rrhf(logps, lengths, scores, reduction="mean"), T([4 / 3, 0.0]))


def test_rrhf_ties_contribute_nothing() -> None:
    out = L.rrhf(T([[-1.0, -5.0]]), T([[1.0, 1.0]]), T([[0.3, 0.3]]))
    torch.testing.assert_close(out, T([0.0]))


def test_lire_by_hand() -> None:
    """T = 2, log pi = [0, 2 ln 3] -> Q = softmax([0, ln 3]) = [1/4, 3/4]; softmax(scores [0, ln 3]) = [1/4, 3/4];
    loss = -(1/16 + 9/16) = -0.625 (mean over K: -0.3125)."""
    logps, scores = T([[0.0, 2 * math.log(3)]]), T([[0.0, math.log(3)]])
    torch.testing.assert_close(L.lire(logps, scores, temperature=2.0), T([-0.625]))
    torch.testing.assert_close(L.lire(logps, scores, 2.0, reduction="mean"), T([-0.3125]))


def test_reward_metrics_by_hand() -> None:
    """beta = 0.5: chosen = 0.5 * [1, 0] -> mean 0.25; rejected = 0.5 * [-1, 1] -> mean 0;
    margins = [1, -0.5] -> 0.25; accuracies: [0.5 > -0.5, 0 > 0.5] = [True, False] -> 0.5."""
    m = L.reward_metrics(T([-1.0, -2.0]), T([-3.0, -1.0]), T([-2.0, -2.0]), T([-2.0, -2.0]), beta=0.5)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"}
    torch.testing.assert_close(torch.stack([m[k] for k in sorted(m)]), T([0.5, 0.25, 0.25, 0.0]))


def test_listwise_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        L.dpo_pl(T([[1.0]]), T([[1.0]]), T([[1.0]]))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        L.lire(T([[1.0, 2.0]]), T([[1.0, 2.0, 3.0]]))


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) - 2).requires_grad_(True)


@pytest.mark.parametrize(
    "fn",
    [
        lambda a, b, c, d: L.dpo(a, b, c, d, 0.3),
        lambda a, b, c, d: L.ipo(a, b, c, d, 0.3),
        lambda a, b, c, d: L.cdpo(a, b, c, d, 0.3, 0.2),
        lambda a, b, c, d: L.rdpo(a, b, c, d, 0.3, 0.2),
        lambda a, b, c, d: L.simpo(a, b, c.abs() + 1, d.abs() + 1, 2.0, 0.5),
    ],
    ids=["dpo", "ipo", "cdpo", "rdpo", "simpo"],
)
def test_pairwise_gradcheck(fn) -> None:
    assert gradcheck(fn, tuple(_r(5, seed=s) for s in range(4)))


def test_listwise_gradcheck() -> None:
    scores = torch.randn(3, 4, dtype=torch.float64)
    lengths = torch.randint(1, 6, (3, 4)).double()
    assert gradcheck(lambda p, r: L.dpo_pl(p, r, scores, 0.5), (_r(3, 4), _r(3, 4, seed=1)))
    assert gradcheck(lambda p: L.rrhf(p, lengths, scores), (_r(3, 4, seed=2),))
    assert gradcheck(lambda p, s: L.lire(p, s, 2.0), (_r(3, 4, seed=3), _r(3, 4, seed=4)))
