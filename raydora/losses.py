"""Per-sample preference losses. Every function returns losses of shape ``[B]``; ``robust`` reduces them.

Log-probabilities are *sums* over response tokens (``logprobs.sequence_logps``). Pairwise inputs are ``[B]``;
listwise inputs are ``[B, K]`` in dataset order, with ``scores [B, K]`` giving the ranking (higher is better).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cdpo", "dpo", "dpo_pl", "ipo", "lire", "rdpo", "reward_metrics", "rrhf", "simpo"]

Reduction = Literal["sum", "mean"]


def _logits(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """DPO's implicit reward margin h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]."""
    return (pc - rc) - (pr - rr)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 0.5:
        raise ValueError(f"{name} must be in [0, 0.5), got {value}")


def dpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """DPO: ``-log sigmoid(beta * h)``. All inputs ``[B]``; returns ``[B]``."""
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -F.logsigmoid(beta * h)


def ipo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1/(2 beta))^2``. Returns ``[B]``."""
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def cdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Conservative DPO (label smoothing eps): ``(1-eps) l(y_w, y_l) + eps l(y_l, y_w)``. Returns ``[B]``."""
    _check_rate("label_smoothing", label_smoothing)
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def rdpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
    flip_rate: float = 0.1,
) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024), unbiased under label flips at rate eps:
    ``[(1-eps) l(y_w, y_l) - eps l(y_l, y_w)] / (1 - 2 eps)``. Returns ``[B]`` (may be negative)."""
    _check_rate("flip_rate", flip_rate)
    h = _logits(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    return (-(1 - flip_rate) * F.logsigmoid(beta * h) + flip_rate * F.logsigmoid(-beta * h)) / (1 - 2 * flip_rate)


def simpo(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free, length-normalised:
    ``-log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``.

    ``gamma`` is the absolute target margin (TRL's ``gamma_beta_ratio * beta``). Returns ``[B]``."""
    margin = beta * policy_chosen_logps / chosen_lengths - beta * policy_rejected_logps / rejected_lengths
    return -F.logsigmoid(margin - gamma)


def _check_listwise(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or first[1] < 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"listwise inputs must share one shape [B, K] with K >= 2, got {shapes}")


def dpo_pl(policy_logps: Tensor, reference_logps: Tensor, scores: Tensor, beta: float = 0.1) -> Tensor:
    """DPO with a Plackett-Luce model over K ranked responses. All inputs ``[B, K]``; returns ``[B]``.

    Sort by score (best first; ties keep dataset order), ``r_k = beta (log pi(y_k) - log ref(y_k))``, and
    ``l = -(1/K) sum_k [r_k - logsumexp_{j >= k} r_j]``. For K = 2 this is DPO divided by 2.
    """
    _check_listwise(policy_logps=policy_logps, reference_logps=reference_logps, scores=scores)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    r = torch.gather(beta * (policy_logps - reference_logps), -1, order)
    # logsumexp over the suffix j >= k: flip, cumulative logsumexp, flip back.
    suffix = torch.logcumsumexp(r.flip(-1), dim=-1).flip(-1)
    return -(r - suffix).mean(dim=-1)


def rrhf(policy_logps: Tensor, lengths: Tensor, scores: Tensor, reduction: Reduction = "sum") -> Tensor:
    """RRHF's ranking term. ``policy_logps, lengths, scores [B, K]``; returns ``[B]``.

    ``s_k = log pi(y_k) / |y_k|``; ``l = sum_{score_i < score_j} max(0, s_i - s_j)`` (ties contribute nothing).
    ``reduction="mean"`` divides by K, as the DoRA authors' code does. Add the SFT term on the best response
    separately (the token-mean NLL from ``logprobs.sequence_logps``).
    """
    _check_listwise(policy_logps=policy_logps, lengths=lengths, scores=scores)
    s = policy_logps / lengths
    # worse[b, i, j] is True where response i is ranked below response j.
    worse = scores.unsqueeze(-1) < scores.unsqueeze(-2)
    diff = (s.unsqueeze(-1) - s.unsqueeze(-2)).clamp_min(0.0)
    loss = (diff * worse).sum(dim=(-1, -2))
    return loss / scores.shape[-1] if reduction == "mean" else loss


def lire(policy_logps: Tensor, scores: Tensor, temperature: float = 2.0, reduction: Reduction = "sum") -> Tensor:
    """LIRE (listwise reward enhancement). ``policy_logps, scores [B, K]``; returns ``[B]``.

    ``Q = softmax_k(log pi(y_k) / T)``; ``l = -sum_k Q_k softmax_k(score)_k``. ``reduction="mean"`` divides by K
    (the authors' code).
    """
    _check_listwise(policy_logps=policy_logps, scores=scores)
    q = torch.softmax(policy_logps / temperature, dim=-1)
    loss = -(q * torch.softmax(scores, dim=-1)).sum(dim=-1)
    return loss / scores.shape[-1] if reduction == "mean" else loss


@torch.no_grad()
def reward_metrics(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float = 0.1,
) -> dict[str, Tensor]:
    """Batch means of DPO's implicit rewards ``beta (log pi - log ref)``: ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins`` and ``rewards/accuracies`` (fraction with chosen > rejected). Scalars, detached."""
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
    }
