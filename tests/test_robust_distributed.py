"""Real multi-process checks of the exact global batch: 2 gloo processes under DDP, holding unequal shards
(3 and 5 rows), must reproduce one process on all 8 rows (value and DDP-averaged gradient) to 1e-8 in float64,
for every objective, both with a per-call all-gather (``group=``) and with gradient accumulation (``share=``),
and for the log-sum-exp ones with gradient accumulation in one pass (``robust.OnlineTilt``), with per-rank
factors before one all-reduce, or with the gradients averaged after every micro-batch (FSDP's way)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest
import robust_cases as rc  # tests/ is on sys.path (pytest rootdir-relative import; spawn inherits sys.path)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from raydora import distributed, robust


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()]).clone()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        group = distributed.default_group()
        x, w = rc.data()
        lo, hi = rc.SHARDS[rank]
        results: dict[str, torch.Tensor] = {}
        for name, obj in rc.OBJECTIVES.items():
            # (a) one micro-batch per rank, gathered inside the objective.
            ddp = DDP(rc.model())
            losses, pen = rc.losses_and_penalties(ddp, x[lo:hi])
            value = obj(losses, w[lo:hi], pen, group=group)
            value.backward()
            results[f"{name}/group/value"] = value.detach()
            results[f"{name}/group/grad"] = _grads(ddp.module)

            # (b) two micro-batches per rank with gradient accumulation: a first pass collects the window's
            # statistics (detached; the penalty itself needs autograd, so no torch.no_grad here), then each
            # micro-batch splices itself into the fixed global vector.
            ddp = DDP(rc.model())
            stats = torch.stack(rc.losses_and_penalties(ddp.module, x[lo:hi]), dim=1).detach()
            full, offset = distributed.all_gather_varlen(torch.cat([stats, w[lo:hi, None]], dim=1), group)
            values = []
            for i, (a, b) in enumerate(rc.MICRO[rank]):
                share = robust.Share(
                    losses=full[:, 0], penalties=full[:, 1], weights=full[:, 2], offset=offset + a - lo,
                    world_size=world,
                )  # fmt: skip
                last = i == len(rc.MICRO[rank]) - 1
                ctx = ddp.no_sync() if not last else contextlib.nullcontext()
                with ctx:
                    losses, pen = rc.losses_and_penalties(ddp, x[a:b])
                    value = obj(losses, w[a:b], pen, share=share)
                    value.backward()
                values.append(value.detach())
            results[f"{name}/share/value"] = torch.stack(values)
            results[f"{name}/share/grad"] = _grads(ddp.module)

            # (c) the same micro-batches in one pass (an online softmax), as the training loop runs the
            # log-sum-exp objectives: plain modules, one factor per rank, then a mean all-reduce.
            if name in rc.TILTS:
                m = rc.model()
                acc = robust.OnlineTilt(rc.TILTS[name], lambda m=m: [p.grad for p in m.parameters()])
                seen = []
                for a, b in rc.MICRO[rank]:
                    losses, pen = rc.losses_and_penalties(m, x[a:b])
                    acc.surrogate(losses, w[a:b]).backward()
                    seen.append(torch.stack([losses.detach(), w[a:b], pen.detach()], dim=1))
                full, _ = distributed.all_gather_varlen(torch.cat(seen), group)
                acc.finish(full[:, 0], full[:, 1], world)
                distributed.all_reduce_mean_([p.grad for p in m.parameters()], group)
                results[f"{name}/online/value"] = obj(full[:, 0], full[:, 1], full[:, 2]).detach()[None]
                results[f"{name}/online/grad"] = _grads(m)

                # (d) one pass with the gradients averaged over the ranks after every micro-batch, as FSDP reduces
                # them (train.fsdp_grad_sync=micro_batch): a shared running max (group=), one factor for all. And
                # the same with each rank's own running max (no group=), which must not match.
                for mode, shared in (("synced", group), ("synced_local", None)):
                    m = rc.model()
                    acc = robust.OnlineTilt(rc.TILTS[name], lambda m=m: [p.grad for p in m.parameters()], shared)
                    seen = []
                    for a, b in rc.MICRO[rank]:
                        losses, pen = rc.losses_and_penalties(m, x[a:b])
                        acc.surrogate(losses, w[a:b]).backward()
                        distributed.all_reduce_mean_([p.grad for p in m.parameters()], group)
                        seen.append(torch.stack([losses.detach(), w[a:b], pen.detach()], dim=1))
                    full, _ = distributed.all_gather_varlen(torch.cat(seen), group)
                    acc.finish(full[:, 0], full[:, 1], world)
                    results[f"{name}/{mode}/value"] = obj(full[:, 0], full[:, 1], full[:, 2]).detach()[None]
                    results[f"{name}/{mode}/grad"] = _grads(m)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize(
    ("name", "mode"),
    [(n, m) for n in rc.OBJECTIVES for m in ("group", "share")]
    + [(n, m) for n in rc.TILTS for m in ("online", "synced")],
)
def test_two_gloo_ranks_equal_one_process(two_rank_results, name: str, mode: str) -> None:
    ref_value, ref_grad = rc.reference()[name]
    assert ref_grad.abs().sum() > 1e-3, "degenerate case: the reference gradient is ~0"
    for res in two_rank_results:
        # Every rank (and every micro-batch) reports the global value ...
        torch.testing.assert_close(res[f"{name}/{mode}/value"], ref_value.expand_as(res[f"{name}/{mode}/value"]),
                                   rtol=0, atol=1e-8)  # fmt: skip
        # ... and after DDP's averaging each rank holds the single-process gradient.
        torch.testing.assert_close(res[f"{name}/{mode}/grad"], ref_grad, rtol=0, atol=1e-8)


def test_naive_local_objective_is_not_global(two_rank_results) -> None:
    """Sanity check that the test can fail: the per-rank objective averaged by DDP differs from the global one
    (this is the authors' one-prompt-per-device degeneration)."""
    ref_value, _ = rc.reference()["kl_dro"]
    x, _ = rc.data()
    naive = []
    for lo, hi in rc.SHARDS:
        losses, _ = rc.losses_and_penalties(rc.model(), x[lo:hi])
        naive.append(robust.kl_dro(losses, 0.7).detach())
    assert abs(torch.stack(naive).mean() - ref_value) > 1e-3


@pytest.mark.parametrize("name", list(rc.TILTS))
def test_gradients_averaged_every_micro_batch_need_the_shared_running_max(two_rank_results, name: str) -> None:
    """Sanity check that the synced mode can fail: with each rank's own running max, the ranks rescale the
    averaged gradients by different factors, and the result is not the single-process gradient."""
    _, ref_grad = rc.reference()[name]
    assert (two_rank_results[0][f"{name}/synced_local/grad"] - ref_grad).abs().max() > 1e-4


def test_all_gather_varlen_single_process() -> None:
    x = torch.arange(6.0).reshape(3, 2)
    full, offset = distributed.all_gather_varlen(x, None)
    assert offset == 0 and torch.equal(full, x)


@pytest.mark.parametrize(("backend", "expected"), [("nccl", {"device_ids": [3]}), ("gloo", {})])
def test_barrier_names_the_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch, backend: str, expected: dict) -> None:
    """A bare NCCL barrier makes NCCL guess each rank's GPU from its global rank (a hang where ranks and GPUs map
    differently): ``barrier`` passes the current device. Gloo takes no device."""
    calls: list[dict] = []
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(distributed.dist, "barrier", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    distributed.barrier()
    assert calls == [expected]
