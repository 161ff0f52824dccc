"""Robust objectives: hand-computed values, limits, float64 gradchecks, DoRA weights and weight statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from raydora import robust as R

T = torch.tensor
# exp(L) = [1, 2, 3]: every log-mean-exp below is a log of a small fraction.
L3 = T([0.0, math.log(2), math.log(3)], dtype=torch.float64)


def test_erm_and_reweight_by_hand() -> None:
    """erm = (0 + ln 2 + ln 3) / 3 = ln 6 / 3 = 0.59725316.
    reweight with w = [3, 1, 0.5]: (0 + ln 2 + 0.5 ln 3) / 3 = (0.69314718 + 0.54930614) / 3 = 0.41415111."""
    torch.testing.assert_close(R.erm(L3), T(math.log(6) / 3, dtype=torch.float64))
    torch.testing.assert_close(
        R.reweight(L3, T([3.0, 1.0, 0.5], dtype=torch.float64)), T(0.41415111, dtype=torch.float64)
    )


def test_kl_dro_by_hand() -> None:
    """lam = 1: log mean [1, 2, 3] = ln 2 = 0.69314718.
    lam = 0.5: 0.5 log mean exp(2L) = 0.5 log mean [1, 4, 9] = 0.5 ln(14/3) = 0.77022256."""
    torch.testing.assert_close(R.kl_dro(L3, 1.0), T(math.log(2), dtype=torch.float64))
    torch.testing.assert_close(R.kl_dro(L3, 0.5), T(0.5 * math.log(14 / 3), dtype=torch.float64))


def test_dora_by_hand() -> None:
    """h~ = [1, 2, 1], lam = 1. Inside: exp(h~ L) = [1, 4, 3], log mean = ln(8/3) = 0.98082925.
    Outside (LIRE code): mean(h~) * ln 2 = (4/3) ln 2 = 0.92419624."""
    w = T([1.0, 2.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(R.dora(L3, w, 1.0), T(math.log(8 / 3), dtype=torch.float64))
    torch.testing.assert_close(R.dora(L3, w, 1.0, calibration="outside"), T(4 / 3 * math.log(2), dtype=torch.float64))


def test_kldpo_by_hand() -> None:
    """tau = 1. Paper: P = softmax(L - mean L) = softmax(L) = [1, 2, 3] / 6;
    sum P L = (2 ln 2 + 3 ln 3) / 6 = (1.38629436 + 3.29583687) / 6 = 0.78035521.
    Code: w = exp(L - ln6/3) = 6^(-1/3) [1, 2, 3] = 0.55032121 [1, 2, 3];
    mean w L = 0.55032121 (2 ln 2 + 3 ln 3) / 3 = 0.85889271. With clip 1.5, w = [0.55032, 1.10064, 1.5]:
    (1.10064243 ln 2 + 1.5 ln 3) / 3 = (0.76290741 + 1.64791843) / 3 = 0.80360861."""
    f64 = dict(dtype=torch.float64)
    torch.testing.assert_close(R.kldpo(L3, 1.0), T((2 * math.log(2) + 3 * math.log(3)) / 6, **f64))
    c = 6 ** (-1 / 3)
    torch.testing.assert_close(R.kldpo(L3, 1.0, normalize=False), T(c * (2 * math.log(2) + 3 * math.log(3)) / 3, **f64))
    torch.testing.assert_close(R.kldpo(L3, 1.0, normalize=False, clip=1.5), T(0.80360861, **f64))


def test_kldpo_gradient_is_the_detached_tilt() -> None:
    """d/dl of KLDPO = P (weights detached): softmax(L) = [1, 2, 3] / 6 for the paper form."""
    x = L3.clone().requires_grad_(True)
    R.kldpo(x, 1.0).backward()
    torch.testing.assert_close(x.grad, T([1 / 6, 2 / 6, 3 / 6], dtype=torch.float64))


def test_dr_dpo_by_hand() -> None:
    """beta' = 1: -log mean [1, 1/2, 1/3] = -ln(11/18) = 0.49247649."""
    torch.testing.assert_close(R.dr_dpo(L3, 1.0), T(math.log(18 / 11), dtype=torch.float64))


def test_wdpo_by_hand() -> None:
    """penalties [1, 4, 0], rho = 0.5. Pointwise: mean(L) + 0.5 * 5/3 = 0.59725316 + 0.83333333 = 1.43058649.
    Global: mean(L) + 0.5 sqrt(5/3) = 0.59725316 + 0.64549722 = 1.24275038."""
    p = T([1.0, 4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(R.wdpo(L3, p, 0.5), T(math.log(6) / 3 + 5 / 6, dtype=torch.float64))
    torch.testing.assert_close(R.wdpo(L3, p, 0.5, mode="global"), T(1.24275038, dtype=torch.float64))


# ---- limits ---------------------------------------------------------------------------------------------------
X = torch.randn(16, generator=torch.Generator().manual_seed(0), dtype=torch.float64).abs() * 3
W = torch.rand(16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3 + 0.1


@pytest.mark.parametrize("lam", [0.1, 1.0, 7.0])
def test_dora_with_unit_weights_is_kl_dro(lam: float) -> None:
    torch.testing.assert_close(R.dora(X, torch.ones_like(X), lam), R.kl_dro(X, lam))


def test_dora_lam_to_infinity_is_reweight() -> None:
    """lam log mean exp(h l / lam) = mean(h l) + O(1/lam)."""
    torch.testing.assert_close(R.dora(X, W, 1e7), R.reweight(X, W), atol=1e-6, rtol=0)
    assert abs(R.dora(X, W, 1.0) - R.reweight(X, W)) > 0.1  # and it is not that at lam = 1


def test_kl_dro_lam_to_zero_is_max() -> None:
    """max l - lam log N <= kl_dro <= max l."""
    lam = 1e-3
    value = R.kl_dro(X, lam)
    assert X.max() - lam * math.log(16) - 1e-12 <= value <= X.max()


@pytest.mark.parametrize("normalize", [True, False])
def test_kldpo_tau_to_infinity_is_mean(normalize: bool) -> None:
    torch.testing.assert_close(R.kldpo(X, 1e9, normalize=normalize), X.mean())
    assert abs(R.kldpo(X, 0.5, normalize=normalize) - X.mean()) > 0.1


def test_dr_dpo_limits() -> None:
    torch.testing.assert_close(R.dr_dpo(X, 1e8), X.mean())
    assert X.min() <= R.dr_dpo(X, 1e-3) <= X.min() + 1e-3 * math.log(16)


def test_dora_weight_is_not_differentiated() -> None:
    x, w = X.clone().requires_grad_(True), W.clone().requires_grad_(True)
    R.dora(x, w).backward()
    assert w.grad is None and x.grad is not None


# ---- gradients ------------------------------------------------------------------------------------------------
SMOOTH = {
    "erm": lambda x, p: R.erm(x),
    "reweight": lambda x, p: R.reweight(x, W[:5]),
    "kl_dro": lambda x, p: R.kl_dro(x, 0.7),
    "dora_inside": lambda x, p: R.dora(x, W[:5], 0.7),
    "dora_outside": lambda x, p: R.dora(x, W[:5], 0.7, calibration="outside"),
    "dr_dpo": lambda x, p: R.dr_dpo(x, 0.8),
    "wdpo_pointwise": lambda x, p: R.wdpo(x, p, 0.3),
    "wdpo_global": lambda x, p: R.wdpo(x, p, 0.3, mode="global"),
}


@pytest.mark.parametrize("name", list(SMOOTH))
def test_objective_gradcheck(name: str) -> None:
    x = X[:5].clone().requires_grad_(True)
    p = (W[:5] + 0.5).clone().requires_grad_(True)
    assert gradcheck(SMOOTH[name], (x, p))
    assert gradgradcheck(SMOOTH[name], (x, p))


# (local rows 4..8 with a Share of the 16-row batch, the same objective on all 16 rows)
SHARED = {
    "erm": (lambda x, p, s: R.erm(x, share=s), lambda: R.erm(X)),
    "reweight": (lambda x, p, s: R.reweight(x, W[4:9], share=s), lambda: R.reweight(X, W)),
    "kl_dro": (lambda x, p, s: R.kl_dro(x, 0.7, share=s), lambda: R.kl_dro(X, 0.7)),
    "dora_inside": (lambda x, p, s: R.dora(x, W[4:9], 0.7, share=s), lambda: R.dora(X, W, 0.7)),
    "dora_outside": (
        lambda x, p, s: R.dora(x, W[4:9], 0.7, calibration="outside", share=s),
        lambda: R.dora(X, W, 0.7, calibration="outside"),
    ),
    "dr_dpo": (lambda x, p, s: R.dr_dpo(x, 0.8, share=s), lambda: R.dr_dpo(X, 0.8)),
    "wdpo_pointwise": (lambda x, p, s: R.wdpo(x, p, 0.3, share=s), lambda: R.wdpo(X, W + 0.5, 0.3)),
    "wdpo_global": (
        lambda x, p, s: R.wdpo(x, p, 0.3, mode="global", share=s),
        lambda: R.wdpo(X, W + 0.5, 0.3, mode="global"),
    ),
}


@pytest.mark.parametrize("name", list(SHARED))
def test_share_surrogate_gradcheck(name: str) -> None:
    """The global-batch surrogate (local rows spliced into a fixed vector) returns the full-batch value and has
    the true gradient of that value with respect to the local rows."""
    local, full = SHARED[name]
    share = R.Share(losses=X, offset=4, weights=W, penalties=W + 0.5)
    x = X[4:9].clone().requires_grad_(True)
    p = (W[4:9] + 0.5).clone().requires_grad_(True)
    assert gradcheck(lambda a, b: local(a, b, share), (x, p))
    torch.testing.assert_close(local(x, p, share).detach(), full())


# ---- DoRA weights and stats -----------------------------------------------------------------------------------
def test_dora_weights_by_hand() -> None:
    """K = 4, alpha = pi = 1/4, gamma = 1: w = 1 / (1/4 + (1/4)(1-p)/p).
    p = 0.95: 1 / (0.25 + 0.25 * 0.05/0.95) = 1 / 0.26315789 = 3.8; p = 0.5: 1 / 0.5 = 2; p = 0.1: 1 / 2.5 = 0.4.
    gamma = 2, p = 0.5: 1 / (0.25 + 0.25 / 2) = 8/3. p = 0 is clipped to eps = 1e-4: 1 / (0.25 + 0.25 * 9999) = 1/2500."""
    p = T([[0.95, 0.5, 0.1, 0.0]], dtype=torch.float64)
    w = R.dora_weights(p, 0.25, alpha=0.25)
    torch.testing.assert_close(w, T([[3.8, 2.0, 0.4, 0.0004]], dtype=torch.float64))
    torch.testing.assert_close(R.dora_weights(T([0.5]), 0.25, 0.25, gamma=2.0), T([8 / 3]))
    # per-source shares broadcast per response
    shares = T([[0.25, 0.5, 0.25, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(R.dora_weights(p, shares, 0.25)[0, 1], T(1 / 0.75, dtype=torch.float64))
    assert (R.dora_weights(torch.rand(100), 0.25, 0.25) < 4).all()


def test_dora_weights_recover_the_density_ratio_from_a_bayes_classifier_with_imbalanced_classes() -> None:
    """Two discrete densities Q0 (golden) and Q1 (a source) over 5 responses; a Bayes-optimal classifier trained on
    gamma = 3 source examples per golden one outputs p = Q0 / (Q0 + 3 Q1). With the mixture P = alpha Q0 + pi Q1,
    the weight must be dQ0/dP = Q0 / (alpha Q0 + pi Q1) exactly (an inverted gamma misses it by up to 9x)."""
    q0 = T([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    q1 = T([0.05, 0.1, 0.15, 0.3, 0.4], dtype=torch.float64)
    gamma, alpha, pi = 3.0, 0.25, 0.75
    p = q0 / (q0 + gamma * q1)
    torch.testing.assert_close(R.dora_weights(p, pi, alpha, gamma, eps=1e-12), q0 / (alpha * q0 + pi * q1))


def test_dora_weights_reject_bad_probabilities() -> None:
    with pytest.raises(ValueError, match="p_golden"):
        R.dora_weights(T([0.5, float("nan")]), 0.25, 0.25)
    with pytest.raises(ValueError, match="alpha"):
        R.dora_weights(T([0.5]), 0.25, 0.0)


def test_weight_stats_by_hand() -> None:
    """w = [1, 1, 2]: ESS = 4^2 / 6 = 2.6667; max 2; p = [1/4, 1/4, 1/2], entropy = 0.5 ln 4 + 0.5 ln 2 = 1.03972077."""
    s = R.weight_stats(T([1.0, 1.0, 2.0]))
    assert s == pytest.approx(
        {"robust/ess": 8 / 3, "robust/weight_max": 2.0, "robust/weight_entropy": 1.5 * math.log(2)}
    )
    u = R.weight_stats(torch.ones(5))
    assert u["robust/ess"] == pytest.approx(5) and u["robust/weight_entropy"] == pytest.approx(math.log(5))


def test_argument_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="lam"):
        R.kl_dro(X, 0.0)
    with pytest.raises(ValueError, match="tau"):
        R.kldpo(X, -1.0)
    with pytest.raises(ValueError, match="weights"):
        R.dora(X, W[:3])
    with pytest.raises(ValueError, match="losses"):
        R.erm(X.reshape(4, 4))
    with pytest.raises(ValueError, match=r"Share\.weights"):
        R.dora(X[:2], W[:2], share=R.Share(losses=X, offset=0))


def test_tilt_by_hand() -> None:
    """L = [0, ln 2, ln 3], h~ = [1, 2, 1], lam = 1: dora inside's scores h~ L = [0, ln 4, ln 3], softmax
    [1, 4, 3] / 8, gradient a * softmax = [1/8, 8/8, 3/8]. Outside: mean(h~) * [1, 2, 3] / 6 = [2/9, 4/9, 6/9].
    dr_dpo (b' = 1): softmax(-L) = [1, 1/2, 1/3] / (11/6) = [6/11, 3/11, 2/11]."""
    w = T([1.0, 2.0, 1.0], dtype=torch.float64)

    def tilt_grad(tilt: R.Tilt) -> torch.Tensor:
        s = tilt.scores(L3, w)
        return tilt.constant(w) * tilt.multipliers(w) * torch.softmax(s, 0)

    cases = {
        R.tilt_of("dora", lam=1.0): [1 / 8, 1.0, 3 / 8],
        R.tilt_of("dora", lam=1.0, calibration="outside"): [2 / 9, 4 / 9, 6 / 9],
        R.tilt_of("dr_dpo", beta_prime=1.0): [6 / 11, 3 / 11, 2 / 11],
        R.tilt_of("kl_dro", lam=1.0): [1 / 6, 2 / 6, 3 / 6],
        R.tilt_of("kldpo", tau=1.0): [1 / 6, 2 / 6, 3 / 6],
    }
    for tilt, expected in cases.items():
        torch.testing.assert_close(tilt_grad(tilt), T(expected, dtype=torch.float64))
    assert R.tilt_of("kldpo", tau=1.0, clip=10.0) is None and R.tilt_of("kldpo", tau=1.0, normalize=False) is None
    assert R.tilt_of("erm") is None and R.tilt_of("wdpo") is None and R.tilt_of("reweight") is None


@pytest.mark.parametrize("name", ["kl_dro", "dora_inside", "dora_outside", "kldpo", "dr_dpo"])
def test_tilt_is_the_objective_gradient(name: str) -> None:
    """c * a_i * softmax(s)_i equals autograd's dF/dl_i of the objective itself."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(9, generator=g, dtype=torch.float64) * 3).requires_grad_(True)
    w = torch.rand(9, generator=g, dtype=torch.float64) * 2 + 0.1
    objective, tilt = {
        "kl_dro": (lambda: R.kl_dro(x, 0.6), R.tilt_of("kl_dro", lam=0.6)),
        "dora_inside": (lambda: R.dora(x, w, 0.6), R.tilt_of("dora", lam=0.6)),
        "dora_outside": (lambda: R.dora(x, w, 0.6, calibration="outside"),
                         R.tilt_of("dora", lam=0.6, calibration="outside")),
        "kldpo": (lambda: R.kldpo(x, 0.4), R.tilt_of("kldpo", tau=0.4)),
        "dr_dpo": (lambda: R.dr_dpo(x, 0.9), R.tilt_of("dr_dpo", beta_prime=0.9)),
    }[name]  # fmt: skip
    (expected,) = torch.autograd.grad(objective(), x)
    s = tilt.scores(x, w)
    torch.testing.assert_close(tilt.constant(w) * tilt.multipliers(w) * torch.softmax(s, 0), expected)


def test_online_tilt_survives_scores_far_beyond_exp_range() -> None:
    """Losses of 1000 at lam = 1 (exp overflows float64 past ~709): the online softmax only ever takes exp of
    differences <= 0, so a parameter's accumulated gradient stays exact. Rows x_i * theta, theta = 1."""
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
    x = T([1000.0, 990.0, 1010.0, 0.0], dtype=torch.float64)
    acc = R.OnlineTilt(R.Tilt(1.0), lambda: [theta.grad])
    for part in (x[:2], x[2:]):  # the max rises from 1000 to 1010 at the second micro-batch
        acc.surrogate(part * theta, torch.ones(2, dtype=torch.float64)).backward()
    acc.finish(x, torch.ones(4, dtype=torch.float64))
    # d/dtheta lam log mean exp(x theta) = sum softmax(x)_i x_i
    expected = (torch.softmax(x, 0) * x).sum()
    torch.testing.assert_close(theta.grad[0], expected)


def test_online_tilt_propagates_nan() -> None:
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
    acc = R.OnlineTilt(R.Tilt(1.0), lambda: [theta.grad])
    acc.surrogate(T([1.0, 2.0], dtype=torch.float64) * theta, torch.ones(2, dtype=torch.float64)).backward()
    acc.surrogate(T([float("nan"), 2.0], dtype=torch.float64) * theta, torch.ones(2, dtype=torch.float64)).backward()
    acc.finish(T([1.0, 2.0, float("nan"), 2.0]), torch.ones(4))
    assert math.isnan(float(theta.grad[0]))


def test_online_tilt_weighs_minus_infinite_scores_zero() -> None:
    """dr_dpo at an infinite loss scores -inf: weight 0 in the softmax, also when it comes first on a rank (the
    running max is then -inf, and exp(-inf - -inf) would be NaN). Rows l_i = x_i + theta * c_i (a finite
    derivative c_i even where the loss is infinite): the gradient is sum_i softmax(-x)_i c_i over the finite rows."""
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    x = T([float("inf"), 0.079, 0.065, 0.007], dtype=torch.float64)
    c = T([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    acc = R.OnlineTilt(R.tilt_of("dr_dpo", beta_prime=1.0), lambda: [theta.grad])
    ones = torch.ones(4, dtype=torch.float64)
    for part in (slice(0, 1), slice(1, 2), slice(2, 4)):
        acc.surrogate(x[part] + theta * c[part], ones[part]).backward()
    acc.finish(x, ones)
    torch.testing.assert_close(theta.grad[0], (torch.softmax(-x[1:], 0) * c[1:]).sum())
