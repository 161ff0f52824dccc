"""Robust objectives: reduce per-sample losses ``[B]`` to one scalar, exactly over the *global* batch.

Every objective is a function ``F(l_1..l_N)`` of the per-sample losses of the whole global batch (all ranks,
all gradient-accumulation micro-batches). Locally, a rank only holds its own rows. To stay exact we:

1. all-gather the *detached* losses (and weights / penalties) of every rank (``distributed.all_gather_varlen``);
2. splice this rank's own, grad-carrying rows back into the gathered vector at its offset;
3. evaluate ``F`` on that vector. Autograd then gives ``dF/dl_i`` for exactly the local rows;
4. return ``F.detach() + W * (F - F.detach())``: the *value* is the global objective, and the gradient is
   scaled by the world size ``W`` so that DDP's gradient *averaging* yields ``sum_i dF/dl_i * grad l_i``.

Gradient accumulation works the same way through a :class:`Share`: a first no-grad pass collects the losses
of the whole window, and each micro-batch then splices itself into that fixed vector. Every micro-batch
returns the same (global) value, and the accumulated gradient is exactly that of the global objective.

Without ``group`` or ``share`` the local batch *is* the global batch and plain autograd is used (so higher-order
derivatives, e.g. ``gradcheck``/``gradgradcheck``, work too).

**One pass instead of two.** The log-sum-exp objectives (kl_dro, dora, normalised unclipped kldpo, dr_dpo) have
gradients of one shape: ``dF/dl_i = c * a_i * softmax(s)_i`` (a :class:`Tilt`). :class:`OnlineTilt` accumulates
them over micro-batches in a single pass, like an online softmax: each micro-batch backpropagates
``sum_i a_i exp(s_i - m) l_i`` against the running max ``m`` of the scores seen so far on this rank, the
gradients already accumulated are rescaled when ``m`` rises, and at the end one factor
``c * exp(m - M) / Z`` (``M``, ``Z``: the global max and normaliser, from the losses gathered for the metrics
anyway) turns this rank's sum into its share of the exact global gradient. No window pass, no extra collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from raydora.distributed import ProcessGroup, all_gather_varlen, all_reduce_max_, world_size

__all__ = [
    "OnlineTilt",
    "Share",
    "Tilt",
    "dora",
    "dora_weights",
    "dr_dpo",
    "erm",
    "kl_dro",
    "kldpo",
    "reweight",
    "wdpo",
    "wdpo_penalty",
    "weight_stats",
]


@dataclass(frozen=True)
class Share:
    """One micro-batch's share of a global batch that spans ranks and gradient-accumulation steps.

    Build it once per optimizer step from a no-grad pass over the window (see ``docs/objectives.md``):

    - ``losses [N]``: detached per-sample losses of the whole global batch (every rank, every micro-batch);
    - ``offset``: index in ``losses`` of this micro-batch's first row;
    - ``weights [N]`` / ``penalties [N]``: the same for objectives that need them (``dora``, ``reweight``,
      ``wdpo`` in ``global`` mode);
    - ``world_size``: ranks whose gradients DDP averages (the gradient is scaled by it).
    """

    losses: Tensor
    offset: int
    weights: Tensor | None = None
    penalties: Tensor | None = None
    world_size: int = 1


def _check_1d(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape [B], got {tuple(x.shape)}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(like.shape)} like the losses")


def _positive(name: str, value: float) -> None:
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def _splice(full: Tensor, local: Tensor, offset: int) -> Tensor:
    """``full`` with rows ``offset : offset + len(local)`` replaced by ``local`` (keeping its autograd graph)."""
    n = local.shape[0]
    if offset < 0 or offset + n > full.shape[0]:
        raise ValueError(f"share offset {offset} + {n} rows exceeds the global batch of {full.shape[0]}")
    full = full.detach().to(local.dtype)
    return torch.cat([full[:offset], local, full[offset + n :]])


def _global(
    fn: Callable[..., Tensor],
    columns: Sequence[Tensor],
    names: Sequence[str],
    group: ProcessGroup | None,
    share: Share | None,
) -> Tensor:
    """Evaluate ``fn(*global_columns)`` with the exact global-batch value and DDP-exact local gradient.

    ``columns`` are local ``[B]`` tensors; ``names`` the matching :class:`Share` fields."""
    if share is not None and group is not None:
        raise ValueError("pass either group (gather now) or share (gathered for the accumulation window), not both")
    if share is None and group is None:
        return fn(*columns)
    if share is not None:
        full = []
        for name, local in zip(names, columns, strict=True):
            window = getattr(share, name)
            if window is None:
                raise ValueError(f"this objective needs Share.{name}")
            full.append(_splice(window, local, share.offset))
        scale = share.world_size
    else:
        # One collective for every column: stack them as [n, C].
        stacked, offset = all_gather_varlen(torch.stack([c.detach() for c in columns], dim=1), group)
        full = [_splice(stacked[:, j], c, offset) for j, c in enumerate(columns)]
        scale = world_size(group)
    out = fn(*full)
    if scale == 1:
        return out
    return out.detach() + scale * (out - out.detach())


def _lme(x: Tensor) -> Tensor:
    """log-mean-exp over the batch: ``log (1/N) sum exp(x)``, stably."""
    return torch.logsumexp(x, dim=0) - math.log(x.shape[0])


def erm(losses: Tensor, *, group: ProcessGroup | None = None, share: Share | None = None) -> Tensor:
    """Empirical risk: ``mean_i l_i`` over the global batch. ``losses [B]`` -> scalar."""
    _check_1d("losses", losses)
    return _global(lambda x: x.mean(), [losses], ["losses"], group, share)


def reweight(
    losses: Tensor, weights: Tensor, *, group: ProcessGroup | None = None, share: Share | None = None
) -> Tensor:
    """Importance reweighting: ``mean_i w_i l_i`` (DoRA's lambda -> inf limit). ``losses, weights [B]``."""
    _check_1d("losses", losses)
    _check_1d("weights", weights, losses)
    return _global(lambda x, w: (w * x).mean(), [losses, weights.detach()], ["losses", "weights"], group, share)


def kl_dro(
    losses: Tensor, lam: float = 1.0, *, group: ProcessGroup | None = None, share: Share | None = None
) -> Tensor:
    """KL-DRO dual: ``lam * log( (1/N) sum_i exp(l_i / lam) )``.

    Its gradient is ``sum_i q_i grad l_i`` with ``q = softmax(l / lam)``: the worst case in the KL ball.
    ``lam -> 0`` approaches ``max l``; ``lam -> inf`` approaches ``mean l``.
    """
    _check_1d("losses", losses)
    _positive("lam", lam)
    return _global(lambda x: lam * _lme(x / lam), [losses], ["losses"], group, share)


def dora(
    losses: Tensor,
    weights: Tensor,
    lam: float = 1.0,
    *,
    calibration: Literal["inside", "outside"] = "inside",
    group: ProcessGroup | None = None,
    share: Share | None = None,
) -> Tensor:
    """DoRA's calibrated KL-DRO. ``losses [B]``, ``weights [B]`` (h~ per prompt, see ``dora_weights``).

    - ``calibration="inside"`` (the paper): ``lam * log( (1/N) sum_i exp(h~_i l_i / lam) )``;
      gradient ``sum_i q_i h~_i grad l_i`` with ``q = softmax(h~ * l / lam)``.
    - ``calibration="outside"`` (the authors' LIRE code): ``mean(h~) * lam * log( (1/N) sum_i exp(l_i / lam) )``.

    ``h~ = 1`` gives ``kl_dro``; ``lam -> inf`` gives ``reweight``. Weights are data: no gradient flows into them.
    """
    _check_1d("losses", losses)
    _check_1d("weights", weights, losses)
    _positive("lam", lam)
    if calibration == "inside":

        def fn(x: Tensor, w: Tensor) -> Tensor:
            return lam * _lme(w * x / lam)

    elif calibration == "outside":

        def fn(x: Tensor, w: Tensor) -> Tensor:
            return w.mean() * lam * _lme(x / lam)

    else:
        raise ValueError(f"calibration must be 'inside' or 'outside', got {calibration!r}")
    return _global(fn, [losses, weights.detach()], ["losses", "weights"], group, share)


def kldpo(
    losses: Tensor,
    tau: float,
    normalize: bool = True,
    clip: float | None = None,
    *,
    group: ProcessGroup | None = None,
    share: Share | None = None,
) -> Tensor:
    """KLDPO (WDPO/KLDPO paper, Algorithm 2): tilt by ``w_i = exp((l_i - mean_j l_j) / tau)`` over the global batch.

    The weights are detached (Danskin: the gradient of the sup is taken at the worst-case distribution).

    - ``normalize=True`` (paper): ``P = w / sum w`` and the objective is ``sum_i P_i l_i``.
    - ``normalize=False, clip=10`` (the official code): ``mean_i min(w_i, 10) * l_i``, unnormalised.

    ``clip`` caps ``w_i`` before any normalisation. ``tau -> inf`` gives ``mean l`` in both variants.
    """
    _check_1d("losses", losses)
    _positive("tau", tau)
    if clip is not None:
        _positive("clip", clip)

    def fn(x: Tensor) -> Tensor:
        z = (x - x.mean()).detach() / tau
        if clip is not None:
            z = z.clamp(max=math.log(clip))
        if normalize:
            return (torch.softmax(z, dim=0) * x).sum()
        return (torch.exp(z) * x).mean()

    return _global(fn, [losses], ["losses"], group, share)


def dr_dpo(
    losses: Tensor, beta_prime: float = 1.0, *, group: ProcessGroup | None = None, share: Share | None = None
) -> Tensor:
    """Dr.DPO (Wu et al. 2024): ``-beta' * log( (1/N) sum_i exp(-l_i / beta') )``. Down-weights high-loss pairs."""
    _check_1d("losses", losses)
    _positive("beta_prime", beta_prime)
    return _global(lambda x: -beta_prime * _lme(-x / beta_prime), [losses], ["losses"], group, share)


def wdpo(
    losses: Tensor,
    penalties: Tensor,
    rho: float,
    mode: Literal["pointwise", "global"] = "pointwise",
    *,
    group: ProcessGroup | None = None,
    share: Share | None = None,
) -> Tensor:
    """WDPO (Algorithm 1). ``losses [B]``, ``penalties [B]`` from :func:`wdpo_penalty`.

    - ``mode="pointwise"`` (as trained by the authors): ``mean_i (l_i + rho * ||grad_z l_i||^2)``;
    - ``mode="global"`` (the paper's bound): ``mean_i l_i + rho * sqrt(mean_i ||grad_z l_i||^2)``.
    """
    _check_1d("losses", losses)
    _check_1d("penalties", penalties, losses)
    if not rho >= 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    if mode == "pointwise":

        def fn(x: Tensor, p: Tensor) -> Tensor:
            return (x + rho * p).mean()

    elif mode == "global":

        def fn(x: Tensor, p: Tensor) -> Tensor:
            return x.mean() + rho * p.mean().sqrt()

    else:
        raise ValueError(f"mode must be 'pointwise' or 'global', got {mode!r}")
    return _global(fn, [losses, penalties], ["losses", "penalties"], group, share)


def wdpo_penalty(losses: Tensor, embeddings: Tensor | Sequence[Tensor]) -> Tensor:
    """Per-sample squared gradient norm ``||d l_i / d z||^2`` over input embeddings. Returns ``[B]``.

    ``embeddings`` is the ``inputs_embeds`` tensor (or several, e.g. chosen and rejected) the losses were
    computed from, each ``[m * B, T, D]``: row ``r`` belongs to sample ``r % B`` (TRL's concatenated layout,
    chosen rows then rejected rows). The norms of all rows of a sample are summed.

    Rows must not interact (true for transformers, whose attention is per sequence), so one backward of
    ``sum_i l_i`` yields every per-sample gradient. ``create_graph=True`` keeps the graph, so an update
    through ``l + rho * penalty`` differentiates through the penalty (a double backward: use eager or math
    attention, fused kernels may not support it).
    """
    _check_1d("losses", losses)
    embs = [embeddings] if isinstance(embeddings, Tensor) else list(embeddings)
    if not embs or any(not e.requires_grad for e in embs):
        raise ValueError("embeddings must be the grad-carrying inputs_embeds used in the forward pass")
    grads = torch.autograd.grad(losses.sum(), embs, create_graph=True, allow_unused=True)
    b = losses.shape[0]
    penalty = losses.new_zeros(b)
    for i, (e, g) in enumerate(zip(embs, grads, strict=True)):
        if g is None:
            raise ValueError(f"embeddings[{i}] does not influence the losses: pass the tensor fed to the model")
        if e.shape[0] % b:
            raise ValueError(f"embeddings[{i}] has {e.shape[0]} rows, not a multiple of the batch size {b}")
        penalty = penalty + g.reshape(e.shape[0] // b, b, -1).pow(2).sum(dim=(0, 2))
    return penalty


def dora_weights(
    p_golden: Tensor,
    source_share: Tensor | float,
    alpha: float,
    gamma: Tensor | float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """DoRA density-ratio weight per response: ``w = 1 / (alpha + pi_src * (1-p) / (gamma * p))``.

    ``p_golden`` (any shape, e.g. ``[B, K]``) is the calibrated classifier probability that the response is
    golden, clipped to ``[eps, 1-eps]``; ``source_share`` is the mixture share pi of each response's source and
    ``gamma`` the classifier's class-imbalance ratio (#source / #golden), both broadcastable. ``alpha`` is the
    golden share (the code uses ``1/K``). A classifier trained on ``gamma`` source examples per golden one has
    odds ``p / (1-p) = Q0 / (gamma Q_src)``, so ``Q_src / Q0 = (1-p) / (gamma p)`` and ``w = Q0 / (alpha Q0 +
    pi Q_src)`` estimates ``dQ0/dP`` in ``(0, 1/alpha)``. (The authors' code fixes gamma = 1, where the
    placement of gamma does not matter; before 2026-12-03 raydora multiplied by gamma, inverting it.)
    Per prompt, h~ is the mean over its responses: ``dora_weights(...).mean(-1)``.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if not 0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    if torch.isnan(p_golden).any() or (p_golden < 0).any() or (p_golden > 1).any():
        raise ValueError("p_golden must be probabilities in [0, 1] (found NaN or out-of-range values)")
    share = torch.as_tensor(source_share, dtype=p_golden.dtype, device=p_golden.device)
    if (share < 0).any():
        raise ValueError("source_share must be >= 0")
    p = p_golden.clamp(eps, 1 - eps)
    return 1.0 / (alpha + share * (1 - p) / (gamma * p))


def dora_mixture_weights(p_target: Tensor, alpha: float, eps: float = 1e-4) -> Tensor:
    """DoRA's weight per response in the one-mixture form: ``w = p / (1 - p)``, capped at ``1 / alpha``.

    ``p_target`` is the probability of "target (Q0) vs the whole training mixture P" with balanced odds,
    ``p / (1 - p) = dQ0/dP`` (a target-vs-mixture classifier's calibrated probability with its class imbalance
    divided out, as ``classify.mixture_p_golden`` does), clipped to ``[eps, 1-eps]``. When the target makes up a
    share ``alpha`` of P, ``dQ0/dP <= 1 / alpha``: the cap keeps the per-source form's bound ``(0, 1/alpha)``."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if torch.isnan(p_target).any() or (p_target < 0).any() or (p_target > 1).any():
        raise ValueError("p_target must be probabilities in [0, 1] (found NaN or out-of-range values)")
    p = p_target.clamp(eps, 1 - eps)
    return (p / (1 - p)).clamp(max=1.0 / alpha)


@dataclass(frozen=True)
class Tilt:
    """A log-sum-exp objective's gradient as a softmax tilt: ``dF/dl_i = c * a_i * softmax(s)_i`` with

    - scores ``s_i = sign * (h_i if weighted == "inside" else 1) * l_i / temperature``;
    - multipliers ``a_i = h_i`` when ``weighted == "inside"``, else 1;
    - a global constant ``c = mean_j h_j`` when ``weighted == "outside"``, else 1.

    kl_dro(lam) is ``Tilt(lam)``, dora(lam) ``Tilt(lam, weighted=...)``, kldpo(tau) (normalised, unclipped)
    ``Tilt(tau)`` (Danskin: the gradient of the tilted sum is the softmax-weighted one), dr_dpo(b) ``Tilt(b, -1)``.
    ``h`` are the rows' weights (data, no gradient).
    """

    temperature: float
    sign: float = 1.0
    weighted: Literal["none", "inside", "outside"] = "none"

    def scores(self, losses: Tensor, weights: Tensor) -> Tensor:
        s = self.sign * losses.detach().double() / self.temperature
        return s * weights.detach().double() if self.weighted == "inside" else s

    def multipliers(self, weights: Tensor) -> Tensor | float:
        return weights.detach().double() if self.weighted == "inside" else 1.0

    def constant(self, weights: Tensor) -> Tensor | float:
        return weights.detach().double().mean() if self.weighted == "outside" else 1.0


def tilt_of(objective: str, **params: object) -> Tilt | None:
    """The :class:`Tilt` of an objective with these settings, or None when its gradient is not a softmax tilt
    (erm, reweight: linear; wdpo; kldpo clipped or unnormalised: the weight depends on the global mean)."""
    if objective == "kl_dro":
        return Tilt(float(params["lam"]))  # type: ignore[arg-type]
    if objective == "dora":
        return Tilt(float(params["lam"]), weighted=params.get("calibration", "inside"))  # type: ignore[arg-type]
    if objective == "kldpo" and params.get("normalize", True) and params.get("clip") is None:
        return Tilt(float(params["tau"]))  # type: ignore[arg-type]
    if objective == "dr_dpo":
        return Tilt(float(params["beta_prime"]), sign=-1.0)  # type: ignore[arg-type]
    return None


class OnlineTilt:
    """One optimizer step of a :class:`Tilt` objective over micro-batches, in one pass (an online softmax).

    For each micro-batch: ``surrogate = acc.surrogate(losses, weights)``, then ``surrogate.backward()``. When the
    running max of the scores rises, ``surrogate`` first rescales the gradients accumulated so far (``grads()``,
    the tensors backward accumulates into) by ``exp(m_old - m_new)``, so that they always hold
    ``sum_i a_i exp(s_i - m) grad l_i`` for the rows seen. After the last micro-batch,
    ``finish(all_losses, all_weights, world)`` multiplies this rank's gradients by ``factor(...)``, ready for a
    *mean* all-reduce over ``world`` ranks (or ``world=1`` without one): ``world * c * exp(m - M) / Z`` with the
    global max ``M`` and ``Z = sum_j exp(s_j - M)`` over the gathered rows of every rank.

    ``group``: for gradients that are already averaged over the ranks after every backward (FSDP reducing each
    micro-batch), where a rank can no longer scale its own share. The running max is then the max over every rank
    of ``group`` (one scalar all-reduce per micro-batch), so every rank rescales the shared gradients alike and
    :meth:`finish`'s factor, ``world * c / Z``, is the same on each. Every rank must run as many micro-batches.
    """

    def __init__(self, tilt: Tilt, grads: Callable[[], Sequence[Tensor]], group: ProcessGroup | None = None):
        self.tilt = tilt
        self.grads = grads
        self.group = group
        self.shift: Tensor | None = None  # running max of the scores (float64, stays on the device)

    def surrogate(self, losses: Tensor, weights: Tensor) -> Tensor:
        """``sum_i a_i exp(s_i - m) l_i`` over this micro-batch (coefficients detached); rescales the gradients
        accumulated so far first when this micro-batch raises the running max ``m``."""
        _check_1d("losses", losses)
        _check_1d("weights", weights, losses)
        s = self.tilt.scores(losses, weights)
        top = s.max()
        if self.group is not None:
            all_reduce_max_(top, self.group)
        if self.shift is None:
            self.shift = top
        else:
            new = torch.maximum(self.shift, top)  # NaN propagates: a NaN loss makes every gradient NaN
            if bool(new > self.shift):
                self._scale(float(torch.exp(self.shift - new)))
            self.shift = new
        # A score of -inf (dr_dpo at an infinite loss) weighs 0, as in the softmax, even while the running max is
        # still -inf (exp(-inf - -inf) would be NaN).
        e = torch.exp(s - self.shift).where(~torch.isneginf(s), torch.zeros_like(s))
        coef = self.tilt.multipliers(weights) * e
        return (coef.to(losses.dtype) * losses).sum()

    def factor(self, losses: Tensor, weights: Tensor, world: int = 1) -> float:
        """This rank's gradient factor, from every rank's detached ``losses`` and ``weights`` ``[N]``."""
        if self.shift is None:
            raise RuntimeError("OnlineTilt.factor before any micro-batch")
        s = self.tilt.scores(losses, weights).to(self.shift.device)
        top = s.max()
        z = torch.exp(s - top).sum()
        return float(world * self.tilt.constant(weights) * torch.exp(self.shift - top) / z)

    def finish(self, losses: Tensor, weights: Tensor, world: int = 1) -> float:
        """Multiply the accumulated gradients by :meth:`factor` (ready for a mean all-reduce); returns it."""
        factor = self.factor(losses, weights, world)
        self._scale(factor)
        return factor

    def _scale(self, factor: float) -> None:
        grads = [g for g in self.grads() if g is not None]
        if grads:
            torch._foreach_mul_(grads, factor)


def weight_stats(weights: Tensor, *, group: ProcessGroup | None = None) -> dict[str, float]:
    """Diagnostics of (global) sample weights ``[N]``: Kish ESS ``(sum w)^2 / sum w^2``, max, and the entropy of
    ``w / sum w`` (``log N`` when uniform). Keys: ``robust/ess``, ``robust/weight_max``, ``robust/weight_entropy``.
    """
    w = weights.detach().reshape(-1)
    if group is not None:
        w, _ = all_gather_varlen(w, group)
    w = w.double()
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    p = w / w.sum()
    entropy = -(p * torch.log(p.clamp_min(1e-300))).where(p > 0, torch.zeros_like(p)).sum()
    return {
        "robust/ess": float(w.sum() ** 2 / (w**2).sum()),
        "robust/weight_max": float(w.max()),
        "robust/weight_entropy": float(entropy),
    }
