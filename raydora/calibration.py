"""Binary-classifier calibration and metrics: temperature and Platt scaling, accuracy, ROC-AUC, ECE. Pure numpy.

A classifier's output is the logit margin ``z = logit_golden - logit_other``; its calibrated probability of
"golden" is ``sigmoid(z / T + b)`` (``calibrated``).
- **Temperature scaling** (``b = 0``): ``T`` is fit on held-out data by minimising the negative log-likelihood,
  which is convex in ``1 / T``, so a golden-section search finds the optimum without any tuning. It rescales the
  margins but cannot move them: a classifier whose margins are offset (it calls too many responses golden, say)
  keeps its calibration error.
- **Platt scaling** (``T`` and ``b``): the same NLL over both. For each ``1 / T`` the best ``b`` is the root of a
  monotone function (Newton steps inside a bracket); the NLL is jointly convex, so its minimum over ``b`` is
  convex in ``1 / T`` and the same golden-section search finds ``T``. ``T`` keeps temperature scaling's bounds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def sigmoid(z: ArrayLike) -> Array:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))  # never overflows
    out: Array = np.where(z >= 0, 1 / (1 + e), e / (1 + e))
    return out


def calibrated(margins: ArrayLike, temperature: float = 1.0, bias: float = 0.0) -> Array:
    """The calibrated probability of "golden": ``sigmoid(z / T + b)``."""
    return sigmoid(np.asarray(margins, dtype=np.float64) / temperature + bias)


def nll(margins: ArrayLike, labels: ArrayLike, temperature: float = 1.0, bias: float = 0.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(z / T + b)`` against labels in {0, 1}, computed stably."""
    z = np.asarray(margins, dtype=np.float64) / temperature + bias
    y = np.asarray(labels, dtype=np.float64)
    # -[y log s(z) + (1-y) log(1 - s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _both_classes(labels: ArrayLike, what: str) -> None:
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        raise ValueError(f"{what} needs held-out examples of both classes")


def fit_temperature(margins: ArrayLike, labels: ArrayLike, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The ``T`` in ``[lo, hi]`` minimising held-out NLL (golden-section search over ``a = 1/T``, where the NLL
    is convex). Needs both classes present."""
    _both_classes(labels, "temperature scaling")
    return _golden_section_temperature(lambda t: nll(margins, labels, t), lo, hi)


def best_bias(margins: ArrayLike, labels: ArrayLike, temperature: float) -> float:
    """The ``b`` minimising the NLL of ``sigmoid(z / T + b)`` for a fixed ``T``: the root of
    ``g(b) = mean(sigmoid(z / T + b)) - mean(y)``, which rises monotonically in ``b``. Newton steps, kept inside a
    bracket of the root (a step that leaves it bisects instead)."""
    z = np.asarray(margins, dtype=np.float64) / temperature
    target = float(np.mean(np.asarray(labels, dtype=np.float64)))
    # At b = logit(target) - max(z) every p is at most target, at logit(target) - min(z) at least: the root lies
    # between (both classes present: 0 < target < 1).
    logit = math.log(target / (1 - target))
    lo, hi = logit - float(z.max()), logit - float(z.min())
    b = (lo + hi) / 2
    for _ in range(200):
        s = sigmoid(z + b)
        gb, slope = float(np.mean(s)) - target, float(np.mean(s * (1 - s)))
        if gb == 0 or hi - lo <= 1e-13 * max(1.0, abs(b)):
            break
        lo, hi = (b, hi) if gb < 0 else (lo, b)
        step = b - gb / slope if slope > 0 else lo - 1.0
        new = step if lo < step < hi else (lo + hi) / 2
        if abs(new - b) <= 1e-13 * max(1.0, abs(b)):
            return new
        b = new
    return b


def fit_platt(margins: ArrayLike, labels: ArrayLike, lo: float = 1e-3, hi: float = 1e3) -> tuple[float, float]:
    """``(T, b)`` minimising held-out NLL of ``sigmoid(z / T + b)``, ``T`` in ``[lo, hi]``. Needs both classes."""
    _both_classes(labels, "Platt scaling")
    t = _golden_section_temperature(lambda t: nll(margins, labels, t, best_bias(margins, labels, t)), lo, hi)
    return t, best_bias(margins, labels, t)


def _golden_section_temperature(f_of_t: Callable[[float], float], lo: float, hi: float) -> float:
    """Minimise a function of ``T`` that is unimodal in ``1 / T``, by golden-section search over ``log(1 / T)``."""
    phi = (math.sqrt(5) - 1) / 2
    a, b = 1 / hi, 1 / lo
    # search in log space: the optimum of 1/T can sit anywhere in [1e-3, 1e3]
    la, lb = math.log(a), math.log(b)

    def f(s: float) -> float:
        return float(f_of_t(1 / math.exp(s)))

    c, d = lb - phi * (lb - la), la + phi * (lb - la)
    fc, fd = f(c), f(d)
    for _ in range(100):
        if fc < fd:
            lb, d, fd = d, c, fc
            c = lb - phi * (lb - la)
            fc = f(c)
        else:
            la, c, fc = c, d, fd
            d = la + phi * (lb - la)
            fd = f(d)
    return float(1 / math.exp((la + lb) / 2))


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Probability that a random positive scores above a random negative (ties count 1/2): Mann-Whitney U."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def ece(probs: ArrayLike, labels: ArrayLike, bins: int = 15) -> float:
    """Expected calibration error of P(golden): ``sum_b |B|/n * |mean(y in B) - mean(p in B)|`` over equal-width
    bins of ``p``."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() / len(p) * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def metrics(margins: ArrayLike, labels: ArrayLike, temperature: float = 1.0, bias: float = 0.0) -> dict[str, float]:
    """Accuracy, ROC-AUC, ECE and NLL of ``sigmoid(z / T + b)``."""
    p = calibrated(margins, temperature, bias)
    y = np.asarray(labels)
    return {
        "accuracy": float(((p > 0.5) == (y == 1)).mean()),
        "roc_auc": roc_auc(p, y),
        "ece": ece(p, y),
        "nll": nll(margins, labels, temperature, bias),
    }


def calibrate(holdout: np.ndarray, method: str = "temperature") -> tuple[float, float, dict[str, Any]]:
    """Fit ``T`` (and with ``method="platt"`` the bias ``b``) on the calibration half of ``holdout`` ([3, n]:
    margins, labels, calib flags); measure the other half before and after. Returns ``(T, b, metrics)``."""
    z, y, calib = holdout[0], holdout[1].astype(int), holdout[2].astype(bool)
    if calib.all() or not calib.any():  # a tiny held-out set: use it for both (metrics say so)
        calib = eval_ = np.ones_like(calib)
    else:
        eval_ = ~calib
    if method == "platt":
        t, b = fit_platt(z[calib], y[calib])
    elif method == "temperature":
        t, b = fit_temperature(z[calib], y[calib]), 0.0
    else:
        raise ValueError(f"classifier.calibration: unknown method {method!r} (temperature or platt)")
    result = {
        "method": method,
        "before": metrics(z[eval_], y[eval_], 1.0),
        "after": metrics(z[eval_], y[eval_], t, b),
        "examples": {"calibration": int(calib.sum()), "evaluation": int(eval_.sum())},
        "disjoint_calibration_and_evaluation": bool(not (calib & eval_).any()),
    }
    return t, b, result
