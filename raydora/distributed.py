"""The one module that touches ``torch.distributed`` (and, lazily, the Ray Train context).

Everything here degrades to a single process when no process group is initialised, so the same code runs
under ``pytest``, on one CPU and inside a Ray Train worker group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = Any  # torch.distributed.ProcessGroup; typed loosely because its stub moves between releases


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def default_group() -> ProcessGroup | None:
    """The WORLD group when one is initialised, else None (single process)."""
    return dist.group.WORLD if is_initialized() else None


def world_size(group: ProcessGroup | None = None) -> int:
    """Ranks in ``group`` (1 without a process group)."""
    if group is None:
        return dist.get_world_size() if is_initialized() else 1
    return dist.get_world_size(group)


def rank(group: ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    if group is None:
        return dist.get_rank() if is_initialized() else 0
    return dist.get_rank(group)


def all_gather_varlen(x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, int]:
    """Concatenate ``x [n_r, ...]`` over the ranks of ``group``, where every rank may hold a different ``n_r``.

    Returns ``(gathered [sum n_r, ...], offset)``, ``offset`` being where this rank's rows start. The result is
    detached: collectives carry no gradient (callers splice their own rows back in, see ``robust``).
    """
    x = x.detach()
    if group is None:
        return x, 0
    size = world_size(group)
    me = rank(group)
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n, group=group)
    counts = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad to the longest shard, then cut each one back.
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    gathered = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return gathered, sum(counts[:me])


def train_context() -> dict[str, int]:
    """Rank, local rank and world size of the current Ray Train worker (single process outside Ray Train)."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return {
            "rank": ctx.get_world_rank(),
            "local_rank": ctx.get_local_rank(),
            "world_size": ctx.get_world_size(),
        }
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker, or Ray absent
        return {"rank": rank(), "local_rank": 0, "world_size": world_size()}
