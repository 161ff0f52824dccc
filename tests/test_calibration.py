"""Calibration math (temperature and Platt scaling, AUC, ECE) and the mixture rule for golden / unknown responses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydora import calibration as C
from raydora import robust
from raydora.classify import mixture_p_golden


def test_auc_by_hand() -> None:
    """Positives {0.9, 0.4}, negatives {0.5, 0.1}: pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) -> 3/4.
    A tie counts 1/2: positives {0.5}, negatives {0.5} -> 0.5."""
    assert C.roc_auc([0.9, 0.4, 0.5, 0.1], [1, 1, 0, 0]) == 0.75
    assert C.roc_auc([0.5, 0.5], [1, 0]) == 0.5


def test_ece_by_hand() -> None:
    """Two bins hit: p = 0.9 twice with labels (1, 0): |0.5 - 0.9| = 0.4, weight 1/2; p = 0.1 twice with labels
    (0, 0): |0 - 0.1| = 0.1, weight 1/2. ECE = 0.2 + 0.05 = 0.25."""
    assert C.ece([0.9, 0.9, 0.1, 0.1], [1, 0, 0, 0]) == pytest.approx(0.25)


def test_temperature_recovers_overconfidence_and_lowers_ece() -> None:
    """Labels drawn from sigmoid(z); a classifier reporting 4z is overconfident: T = 4 undoes it."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < C.sigmoid(z)).astype(int)
    t = C.fit_temperature(4 * z, y)
    assert t == pytest.approx(4.0, rel=0.05)
    before, after = C.metrics(4 * z, y), C.metrics(4 * z, y, t)
    assert after["ece"] < before["ece"] / 3 and after["nll"] < before["nll"]
    assert after["roc_auc"] == before["roc_auc"]  # a temperature never changes the ranking


def test_platt_recovers_scale_and_offset_where_a_temperature_cannot() -> None:
    """Labels drawn from sigmoid(z / 2 - 1): the margins are both too large and offset (the classifier calls too
    many responses golden). Platt recovers T = 2, b = -1; the best temperature alone leaves the offset, and its
    ECE, in place. The bias is the NLL's stationary point: mean(p) equals the share of golden labels."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < C.sigmoid(z / 2 - 1)).astype(int)
    t, b = C.fit_platt(z, y)
    assert t == pytest.approx(2.0, rel=0.05) and b == pytest.approx(-1.0, abs=0.05)
    assert np.mean(C.calibrated(z, t, b)) == pytest.approx(y.mean(), abs=1e-9)
    temp = C.fit_temperature(z, y)
    platt, scaled = C.metrics(z, y, t, b), C.metrics(z, y, temp)
    assert scaled["ece"] > 0.1 and platt["ece"] < 0.02
    assert platt["nll"] < scaled["nll"] and platt["roc_auc"] == scaled["roc_auc"]
    # Margins that need no offset: Platt finds b ~ 0 and the temperature scaling's T.
    y0 = (rng.random(20000) < C.sigmoid(z / 2)).astype(int)
    t0, b0 = C.fit_platt(z, y0)
    assert abs(b0) < 0.05 and t0 == pytest.approx(C.fit_temperature(z, y0), rel=0.02)


def test_platt_bias_is_found_for_huge_margins_and_unknown_methods_are_refused() -> None:
    """Margins of +-5e4 at the smallest temperature: the bias's bracket comes from the margins' range, so the fit
    still matches the share of golden labels (a fixed bracket of +-1e6 missed it)."""
    from raydora.calibration import calibrate

    rng = np.random.default_rng(0)
    z = np.r_[np.full(50, 5e4), np.full(50, -5e4)] + rng.normal(0, 1, 100)
    y = (rng.random(100) < 0.45).astype(int)
    b = C.best_bias(z, y, 1e-3)
    assert np.mean(C.calibrated(z, 1e-3, b)) == pytest.approx(y.mean(), abs=1e-9)
    t, b = C.fit_platt(z, y)
    assert np.mean(C.calibrated(z, t, b)) == pytest.approx(y.mean(), abs=1e-9)
    holdout = np.array([z, y, np.arange(100) % 2], dtype=np.float64)
    with pytest.raises(ValueError, match="unknown method 'isotonic'"):
        calibrate(holdout, "isotonic")


def test_calibrated_and_nll_by_hand() -> None:
    """sigmoid(2 / 4 - 0.5) = sigmoid(0) = 1/2; NLL of label 1 there: log 2."""
    assert C.calibrated([2.0], 4.0, -0.5)[0] == 0.5
    assert C.nll([2.0], [1], 4.0, -0.5) == pytest.approx(math.log(2))


def test_nll_matches_torch() -> None:
    z, y = np.array([-3.0, 0.5, 2.0]), np.array([0, 1, 0])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(z / 2), torch.tensor(y, dtype=torch.float64)
    )
    assert C.nll(z, y, 2.0) == pytest.approx(float(ref))


def test_fit_needs_both_classes() -> None:
    with pytest.raises(ValueError, match=r"temperature scaling needs .* both classes"):
        C.fit_temperature([1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match=r"Platt scaling needs .* both classes"):
        C.fit_platt([1.0, 2.0], [0, 0])


def test_mixture_p_golden_by_hand_gives_the_mixture_density_ratio() -> None:
    """Two sources with shares 0.5 / 0.25 (w = 2/3, 1/3), gammas 1 and 2, classifier outputs c = (0.8, 0.5):
    (1-p*)/p* = 2/3 * 0.2/(1*0.8) + 1/3 * 0.5/(2*0.5) = 1/6 + 1/6 = 1/3 -> p* = 3/4.
    DoRA's weight with pi = 0.75, gamma = 1, alpha = 0.25: 1 / (0.25 + 0.75 * 1/3) = 2, which is
    Q0 / (a Q0 + b1 Q1 + b2 Q2) = 1 / (0.25 + 0.5 / r1 + 0.25 / r2) with r1 = 1 * 0.8/0.2 = 4, r2 = 2 * 0.5/0.5 = 2:
    1 / (0.25 + 0.125 + 0.125) = 2."""
    p = mixture_p_golden(np.array([[0.8, 0.5]]), np.array([0.5, 0.25]), np.array([1.0, 2.0]))
    assert p[0] == pytest.approx(0.75)
    w = robust.dora_weights(torch.tensor(p), 0.75, alpha=0.25)
    assert float(w[0]) == pytest.approx(2.0)
    assert 1 / (0.25 + 0.5 / 4 + 0.25 / 2) == pytest.approx(2.0)


def test_mixture_of_one_source_is_that_classifier() -> None:
    c = np.array([[0.3], [0.9]])
    np.testing.assert_allclose(mixture_p_golden(c, np.array([0.4]), np.array([1.0])), c[:, 0])
    assert math.isclose(float(mixture_p_golden(np.array([[0.5]]), np.array([1.0]), np.array([3.0]))[0]), 0.75)
