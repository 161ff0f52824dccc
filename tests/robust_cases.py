"""Shared fixtures for the global-batch tests: a tiny float64 model whose per-sample losses, weights and WDPO
penalties feed every objective. Imported by the test and by the spawned gloo worker processes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from raydora import robust

N, D = 8, 3
SHARDS = [(0, 3), (3, 8)]  # unequal: rank 0 holds 3 rows, rank 1 holds 5
MICRO = [[(0, 1), (1, 3)], [(3, 5), (5, 8)]]  # gradient accumulation: each rank's two micro-batches


def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.rand(N, generator=g, dtype=torch.float64) * 2 + 0.1
    return x, w


def model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(D, 1).double()


def losses_and_penalties(m: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample loss l_i = softplus(3 * (x_i . theta + b)) + 0.1 ||z_i||^2 with z_i = 2 x_i as the 'embedding',
    and its WDPO penalty ||d l_i / d z_i||^2 (second order in the parameters)."""
    z = (2 * x).requires_grad_(True)
    out = m(z / 2).squeeze(-1)
    losses = nn.functional.softplus(3 * out) + 0.1 * (z**2).sum(-1)
    return losses, robust.wdpo_penalty(losses, z)


Objective = Callable[..., Tensor]

OBJECTIVES: dict[str, Objective] = {
    "erm": lambda x, w, p, **kw: robust.erm(x, **kw),
    "reweight": lambda x, w, p, **kw: robust.reweight(x, w, **kw),
    "kl_dro": lambda x, w, p, **kw: robust.kl_dro(x, 0.7, **kw),
    "dora_inside": lambda x, w, p, **kw: robust.dora(x, w, 0.7, **kw),
    "dora_outside": lambda x, w, p, **kw: robust.dora(x, w, 0.7, calibration="outside", **kw),
    "kldpo_paper": lambda x, w, p, **kw: robust.kldpo(x, 0.5, **kw),
    "kldpo_code": lambda x, w, p, **kw: robust.kldpo(x, 0.5, normalize=False, clip=10.0, **kw),
    "dr_dpo": lambda x, w, p, **kw: robust.dr_dpo(x, 0.8, **kw),
    "wdpo_pointwise": lambda x, w, p, **kw: robust.wdpo(x, p, 0.3, **kw),
    "wdpo_global": lambda x, w, p, **kw: robust.wdpo(x, p, 0.3, mode="global", **kw),
}


# The log-sum-exp objectives above as softmax tilts (robust.OnlineTilt: gradient accumulation in one pass).
TILTS: dict[str, robust.Tilt] = {
    "kl_dro": robust.tilt_of("kl_dro", lam=0.7),
    "dora_inside": robust.tilt_of("dora", lam=0.7),
    "dora_outside": robust.tilt_of("dora", lam=0.7, calibration="outside"),
    "kldpo_paper": robust.tilt_of("kldpo", tau=0.5),
    "dr_dpo": robust.tilt_of("dr_dpo", beta_prime=0.8),
}


def reference() -> dict[str, tuple[Tensor, Tensor]]:
    """One process holding all N rows: value and gradient (weight and bias, flattened) per objective."""
    x, w = data()
    out = {}
    for name, obj in OBJECTIVES.items():
        m = model()
        losses, pen = losses_and_penalties(m, x)
        value = obj(losses, w, pen)
        value.backward()
        out[name] = (value.detach(), torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    return out
