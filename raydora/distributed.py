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


def all_reduce_mean_(tensors: list[Tensor], group: ProcessGroup | None = None) -> None:
    """Average ``tensors`` in place over the ranks of ``group`` with one flat, coalesced all-reduce (what DDP does
    with its buckets, minus the overlap). A no-op in a single process."""
    if not is_initialized() or world_size(group) == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= world_size(group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_max_(x: Tensor, group: ProcessGroup | None = None) -> None:
    """``x`` becomes its elementwise max over the ranks of ``group``, in place. A no-op in a single process."""
    if is_initialized() and world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (itself in a single process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank. Under NCCL it names this rank's GPU: Ray Train creates the process group without a
    ``device_id``, and a bare ``barrier()`` then makes NCCL guess the GPU from the global rank (torch warns that
    this "can cause a hang if rank to GPU mapping is heterogeneous", as on nodes with unequal GPU counts)."""
    if not is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard_fsdp(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` with FSDP2 (``fully_shard``): each transformer block (HF's ``_no_split_modules`` classes)
    is its own unit, then the root. Parameters become DTensors; gradients are reduce-scattered and averaged."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module)
    fully_shard(model)
    return model


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train (LoRA: the adapters)."""
    return {k for k, p in model.named_parameters() if p.requires_grad}


def full_state_dict(model: torch.nn.Module, trainable_only: bool = False) -> dict[str, Any]:
    """The unsharded model state on CPU (every rank must call it under FSDP; plain modules just copy).
    ``trainable_only``: only the parameters that train."""
    keep = trainable_names(model) if trainable_only else None
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items() if keep is None or k in keep}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # ignore_frozen_params: the frozen base is never gathered (LoRA under FSDP).
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(model, options=options)
    return {k: v for k, v in state.items() if keep is None or k in keep}


def load_full_state_dict(model: torch.nn.Module, state: dict[str, Any], trainable_only: bool = False) -> None:
    """Load an unsharded state into ``model`` (sharded or not). ``trainable_only``: ``state`` holds exactly the
    parameters that train (a LoRA checkpoint); the frozen rest stays as loaded."""
    if trainable_only:
        expected = trainable_names(model)
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
            raise KeyError(
                f"checkpoint does not match the trainable parameters: missing {missing}, unexpected {unexpected}"
            )
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Only tied parameters (saved once, e.g. GPT-2's lm_head = wte) may be absent from the file.
        own = model.state_dict()
        loaded = {own[k].data_ptr() for k in state if k in own}
        untied = [] if trainable_only else [k for k in missing if own[k].data_ptr() not in loaded]
        if unexpected or untied:
            raise KeyError(f"checkpoint does not match the model: missing {untied[:5]}, unexpected {unexpected[:5]}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state, gathered to full tensors under FSDP."""
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not any(type(p).__name__ == "DTensor" for p in model.parameters()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
