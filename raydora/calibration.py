"""Binary-classifier calibration and metrics: temperature scaling, accuracy, ROC-AUC, ECE. Pure numpy.

A classifier's output is the logit margin ``z = logit_golden - logit_other``; its calibrated probability of
"golden" is ``sigmoid(z / T)``. ``T`` is fit on held-out data by minimising the negative log-likelihood, which
is convex in ``1 / T``, so a golden-section search finds the optimum without any tuning.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


def sigmoid(z: ArrayLike) -> Array:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(-np.abs(z))  # never overflows
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e))


def nll(margins: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> float:
    """Mean binary cross-entropy of ``sigmoid(z / T)`` against labels in {0, 1}, computed stably."""
    z = np.asarray(margins, dtype=np.float64) / temperature
    y = np.asarray(labels, dtype=np.float64)
    # -[y log s(z) + (1-y) log(1 - s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(margins: ArrayLike, labels: ArrayLike, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The ``T`` in ``[lo, hi]`` minimising held-out NLL (golden-section search over ``a = 1/T``, where the NLL
    is convex). Needs both classes present."""
    y = np.asarray(labels)
    if y.size == 0 or y.min() == y.max():
        raise ValueError("temperature scaling needs held-out examples of both classes")
    phi = (math.sqrt(5) - 1) / 2
    a, b = 1 / hi, 1 / lo
    # search in log space: the optimum of 1/T can sit anywhere in [1e-3, 1e3]
    la, lb = math.log(a), math.log(b)
    f = lambda s: nll(margins, labels, 1 / math.exp(s))
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


def metrics(margins: ArrayLike, labels: ArrayLike, temperature: float = 1.0) -> dict[str, float]:
    """Accuracy, ROC-AUC, ECE and NLL of ``sigmoid(z / T)``."""
    p = sigmoid(np.asarray(margins, dtype=np.float64) / temperature)
    y = np.asarray(labels)
    return {
        "accuracy": float(((p > 0.5) == (y == 1)).mean()),
        "roc_auc": roc_auc(p, y),
        "ece": ece(p, y),
        "nll": nll(margins, labels, temperature),
    }
