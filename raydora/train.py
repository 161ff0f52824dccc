"""Policy optimisation on Ray Train: one ``train_loop_per_worker`` for the SFT warm start and for robust
preference training, on 1..N workers, with exact global-batch robust objectives (see ``docs/training.md``).

**Data order is part of the math.** A robust objective depends on which rows share an optimizer step, so the
global batch of step ``s`` must not depend on the number of workers. Each epoch permutes the rows
deterministically (shuffle blocks of ``shuffle_block_rows`` rows, then the rows inside each block, both seeded by
``seed`` and the epoch); step ``s`` takes the next ``batch_size`` rows and worker ``r`` of ``W`` takes the ``r``-th
contiguous ``batch_size / W`` of them. Every worker gets its own Ray Dataset (``train_<rank>``, read with
``preserve_order``) holding exactly its rows, so 2 workers x batch b see the same global batches as 1 worker x
batch 2b, and a resumed run sees the same batches as an uninterrupted one. The last ``N mod batch_size`` rows of
an epoch are dropped (a different set each epoch).

**One optimizer step** (``Step``): the worker's rows are cut into micro-batches. With one micro-batch the
objective gathers the global losses directly (``group=``). With several, a linear objective (erm, reweight,
pointwise wdpo) needs nothing from the other rows; a log-sum-exp one (kl_dro, dora, kldpo, dr_dpo) accumulates
as an online softmax in one pass (``robust.OnlineTilt``); any other (wdpo global, clipped kldpo, or any of them
under ``train.accumulation=window`` or ``train.fsdp_grad_sync=step``) first runs a no-grad pass over the window,
gathers it once and then backpropagates each micro-batch against that fixed global vector (``robust.Share``).
Gradients are then averaged over workers (one coalesced all-reduce at the end of the step, or FSDP2's
reduce-scatter after every micro-batch), clipped, and AdamW steps with a warmup + cosine (or linear / constant)
schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydora.cluster import check_gpus
from raydora.config import P_GOLDEN_OBJECTIVES
from raydora.config import PAIRWISE_LOSSES as PAIRWISE
from raydora.rundir import StageResult, file_fingerprints, fingerprint, is_done, read_success, write_success
from raydora.tracking import METRICS_FILE, STATE_FILE

FAILED_FILE = "_FAILED"
# Left out of the ``_SUCCESS`` manifest of train/ and sft/: Ray Train manages (and prunes) checkpoints/, and the
# logs and diagnostics may be deleted without invalidating final/ (which, with the metrics, is in the manifest).
UNTRACKED = ("checkpoints", "tensorboard", "workers", "wandb", STATE_FILE)
TRAINER_STATE = "trainer_model.safetensors"  # LoRA checkpoints: the trainable (adapter) parameters, training's names


class NonFiniteLossError(FloatingPointError):
    """A NaN or infinite loss or gradient stopped training (``train.nan_policy=raise``)."""


# ---- data plan ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Plan:
    """The deterministic order of one training run: which rows form each step, for every epoch."""

    entries: list[dict[str, Any]]  # one per shuffle block and epoch, in stream order
    rows: int
    steps_per_epoch: int
    total_steps: int
    batch_size: int
    world: int


def make_plan(
    data_dir: str | Path,
    *,
    batch_size: int,
    world: int,
    epochs: int,
    seed: int,
    block_rows: int,
    max_steps: int = 0,
    start_step: int = 0,
) -> Plan:
    """Plan every epoch's permuted shuffle blocks (reading nothing but parquet footers). Blocks holding only
    steps before ``start_step`` are left out, so a resumed run does not reread them."""
    from raydora.data import parquet_files

    files = parquet_files(data_dir)
    blocks = []
    for f in files:
        n = pq.ParquetFile(f).metadata.num_rows
        blocks += [(str(f), a, min(a + block_rows, n)) for a in range(0, n, block_rows)]
    rows = sum(b[2] - b[1] for b in blocks)
    per_epoch = rows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{data_dir}: {rows} rows make no full step of batch_size={batch_size}")
    total = per_epoch * epochs if not max_steps else min(max_steps, per_epoch * epochs)
    entries = []
    for epoch in range(math.ceil(total / per_epoch)):
        pos = 0
        for j in np.random.default_rng([seed, epoch]).permutation(len(blocks)):
            f, a, b = blocks[int(j)]
            first, last = epoch * per_epoch + pos // batch_size, epoch * per_epoch + (pos + b - a - 1) // batch_size
            if last >= start_step and first < total:
                entries.append({"file": f, "start": a, "stop": b, "epoch": epoch, "pos": pos, "block": int(j)})
            pos += b - a
    return Plan(entries, rows, per_epoch, total, batch_size, world)


def _read_rows(file: str, start: int, stop: int, columns: list[str]) -> pa.Table:
    from raydora.data import row_groups

    pf = pq.ParquetFile(file)
    groups, first = row_groups(pf, start, stop)
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _read_planned(
    batch: dict[str, Any], *, rank: int, plan: dict[str, int], seed: int, columns: list[str]
) -> Iterator[pa.Table]:
    """Ray Data UDF: the rows of this worker in some shuffle blocks, in step order, with a ``_step`` column."""
    b, world, per_epoch = plan["batch_size"], plan["world"], plan["steps_per_epoch"]
    local = b // world
    for f, a, z, epoch, pos, block in zip(batch["file"], batch["start"], batch["stop"], batch["epoch"], batch["pos"],
                                         batch["block"], strict=True):  # fmt: skip
        table = _read_rows(str(f), int(a), int(z), columns)
        perm = np.random.default_rng([seed, int(epoch), int(block)]).permutation(table.num_rows)
        table = table.take(pa.array(perm))
        p = int(pos) + np.arange(table.num_rows)
        step = int(epoch) * per_epoch + p // b
        keep = (
            (p < per_epoch * b)
            & ((p % b) // local == rank)
            & (step >= plan["start_step"])
            & (step < plan["total_steps"])
        )
        if keep.any():
            yield table.filter(pa.array(keep)).append_column("_step", pa.array(step[keep], pa.int64()))


def worker_datasets(plan: Plan, *, seed: int, columns: list[str], start_step: int = 0) -> dict[str, Any]:
    """One ordered Ray Dataset per worker: ``train_<rank>`` holds that worker's rows of every step in order."""
    import ray.data

    info = {"batch_size": plan.batch_size, "world": plan.world, "steps_per_epoch": plan.steps_per_epoch,
            "total_steps": plan.total_steps, "start_step": start_step}  # fmt: skip
    out = {}
    per_task = max(1, 1024 // max(1, plan.entries[0]["stop"] - plan.entries[0]["start"])) if plan.entries else 1
    for r in range(plan.world):
        items = plan.entries or [{"file": "", "start": 0, "stop": 0, "epoch": 0, "pos": 0, "block": 0}]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / per_task)))
        if not plan.entries:
            ds = ds.limit(0)
        # num_cpus=0: the trainers hold the cores; reading token ids is light and must never wait for them.
        # concurrency=1: a 0-CPU task is not bounded by the cores, and Ray Data otherwise ran a dozen at once, each
        # in a fresh worker process (~120 MB), which then lingered idle: 4 GB of the demo's peak memory.
        ds = ds.map_batches(_read_planned, batch_size=per_task, num_cpus=0, concurrency=1,
                            fn_kwargs={"rank": r, "plan": info, "seed": seed, "columns": columns})  # fmt: skip
        ds.context.enable_progress_bars = False  # N workers x bars would bury the step lines
        out[f"train_{r}"] = ds
    return out


# ---- losses and objectives ---------------------------------------------------------------------------------------
def _as_lists(col: Any) -> list[Any]:
    return [np.asarray(x).tolist() if not isinstance(x, list) else x for x in col]


def dora_row_weights(
    p_golden: list[list[float]], sources: list[list[str]], info: dict[str, Any], select: np.ndarray | None = None
) -> np.ndarray:
    """h~ per row: the mean of ``robust.dora_weights`` over the responses the loss uses (shared/papers/dora.md):
    ``select[i]``, the chosen and rejected responses of a pairwise loss, or every response (``select=None``, and
    listwise losses). alpha stays 1/K of the whole row either way.

    A synthetic source's response uses its share pi_s and imbalance gamma_s; a golden or unknown response was
    scored against the whole mixture (``scoring.mixture_p_golden``), so it uses pi = sum of the shares, gamma=1.
    With ``data.target`` (``info["form"] == "target_vs_mixture"``) every response's p is target vs the whole
    mixture, and the weight is the one-mixture ratio :func:`raydora.robust.dora_mixture_weights`."""
    import torch

    from raydora import robust

    shares, gammas, alpha = info["shares"], info["gammas"], info["alpha"]
    total = sum(shares.values())
    out = np.zeros(len(p_golden))
    for i, (ps, ss) in enumerate(zip(p_golden, sources, strict=True)):
        p = torch.tensor(ps, dtype=torch.float64)
        if info.get("form") == "target_vs_mixture":  # data.target: p is already target vs the whole mixture
            w = robust.dora_mixture_weights(p, alpha if alpha is not None else 1.0 / len(ps))
            out[i] = float((w if select is None else w[torch.as_tensor(np.asarray(select[i]))]).mean())
            continue
        pi = torch.tensor([shares.get(s, total) for s in ss], dtype=torch.float64)
        g = torch.tensor([gammas.get(s, 1.0) for s in ss], dtype=torch.float64)
        w = robust.dora_weights(p, pi, alpha if alpha is not None else 1.0 / len(ps), g)
        out[i] = float((w if select is None else w[torch.as_tensor(np.asarray(select[i]))]).mean())
    return out


def collate_micro(
    rows: dict[str, Any],
    idx: slice,
    mode: str,
    loss: str,
    pad_id: int,
    dora: dict[str, Any] | None,
    pack: bool = False,
    multiple_of: int = 0,
) -> dict[str, Any]:
    """One micro-batch: token tensors (k-major; padded, or packed without padding; widths rounded up to a multiple
    of ``multiple_of`` when it is > 0), reference log-probs, scores and weights."""
    import torch

    from raydora.encoding import pack_sequences, pad_sequences, pair_indices

    prompts = _as_lists(rows["prompt_ids"][idx])
    responses = [[np.asarray(r).tolist() for r in rs] for rs in rows["response_ids"][idx]]
    scores = _as_lists(rows["scores"][idx]) if "scores" in rows else [[1.0] * len(r) for r in responses]
    if mode == "sft":
        select = np.zeros((len(prompts), 1), dtype=np.int64)
    elif loss in PAIRWISE:
        select = pair_indices(scores)
    else:
        ks = {len(r) for r in responses}
        if len(ks) != 1:
            raise ValueError(f"listwise loss {loss!r} needs the same number of responses per row, got {sorted(ks)}")
        select = np.tile(np.arange(ks.pop()), (len(prompts), 1))
    layout = pack_sequences if pack else pad_sequences
    batch = layout(prompts, responses, select, pad_id, multiple_of=multiple_of)
    out: dict[str, Any] = {"enc": batch, "k": select.shape[1], "rows": len(prompts)}
    # Row by row: pairwise losses take rows of any K (real data and the online loop's rows vary).
    out["scores"] = (
        torch.tensor([[sc[j] for j in sel] for sc, sel in zip(scores, select, strict=True)], dtype=torch.float64)
        if mode != "sft"
        else None
    )
    if mode != "sft":
        ref = [np.asarray(r, dtype=np.float64) for r in rows["reference_logps"][idx]]
        out["ref"] = torch.tensor(np.stack([r[s] for r, s in zip(ref, select, strict=True)]))
    if dora is not None:
        out["weights"] = torch.tensor(
            dora_row_weights(_as_lists(rows["p_golden"][idx]), _as_lists(rows["sources"][idx]), dora, select)
        )
    return out


def per_sample_losses(
    model: Any, mb: dict[str, Any], cfg: dict[str, Any], *, embeddings: bool = False, embed_shift: Any = None
) -> dict[str, Any]:
    """Forward one micro-batch: per-sample losses ``[b]`` plus what metrics and WDPO need."""
    import torch

    from raydora import losses as L
    from raydora.encoding import forward_logps

    t, mode = cfg["train"], cfg["mode"]
    logps, lengths, embeds = forward_logps(model, mb["enc"], mb["k"], embeddings=embeddings, embed_shift=embed_shift)
    logps, lengths = logps.double(), lengths.double()
    out: dict[str, Any] = {"embeds": embeds, "tokens": mb["enc"]["attention_mask"].sum()}
    if mode == "sft":
        out["losses"] = -(logps[:, 0] / lengths[:, 0].clamp_min(1))
        return out
    ref = mb["ref"].to(logps.device)
    scores = mb["scores"].to(logps.device)
    loss, beta = t["loss"], t["beta"]
    if loss in PAIRWISE:
        pc, pr, rc, rr = logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]
        if loss == "dpo":
            ls = L.dpo(pc, pr, rc, rr, beta)
        elif loss == "ipo":
            ls = L.ipo(pc, pr, rc, rr, beta)
        elif loss == "cdpo":
            ls = L.cdpo(pc, pr, rc, rr, beta, t["label_smoothing"])
        elif loss == "rdpo":
            ls = L.rdpo(pc, pr, rc, rr, beta, t["flip_rate"])
        else:
            ls = L.simpo(pc, pr, lengths[:, 0], lengths[:, 1], beta, t["simpo_gamma"])
        best, worst = torch.zeros_like(pc, dtype=torch.long), torch.ones_like(pc, dtype=torch.long)
    else:
        if loss == "dpo_pl":
            ls = L.dpo_pl(logps, ref, scores, beta)
        elif loss == "rrhf":
            top = scores.argmax(-1, keepdim=True)
            nll = -(logps.gather(1, top) / lengths.gather(1, top).clamp_min(1)).squeeze(1)
            ls = L.rrhf(logps, lengths, scores) + t["sft_weight"] * nll
        else:
            ls = L.lire(logps, scores, t["lire_temperature"])
        best, worst = scores.argmax(-1), scores.argmin(-1)
    rewards = beta * (logps - ref).detach()
    out["losses"] = ls
    out["chosen"] = rewards.gather(1, best[:, None]).squeeze(1)
    out["rejected"] = rewards.gather(1, worst[:, None]).squeeze(1)
    return out


def wdpo_penalty(losses: Any, embeds: Any, enc: dict[str, Any]) -> Any:
    """``robust.wdpo_penalty`` for either layout: padded rows (row ``r`` is sample ``r % B``), or packed rows,
    where each token's squared embedding gradient goes to its sequence (``segment_ids``), then to its sample."""
    import torch

    from raydora import robust

    if "segment_ids" not in enc:
        return robust.wdpo_penalty(losses, embeds)
    (g,) = torch.autograd.grad(losses.sum(), embeds, create_graph=True)
    return sample_sq_norms(g, enc, losses.shape[0]).to(losses.dtype)


def sample_sq_norms(g: Any, enc: dict[str, Any], b: int) -> Any:
    """``[b]``: each sample's squared norm of an embedding-shaped tensor ``g`` (a gradient), summed over its rows
    (padded layout: row ``r`` is sample ``r % b``) or its tokens (packed layout: ``segment_ids``)."""
    if "segment_ids" not in enc:
        return g.reshape(g.shape[0] // b, b, -1).pow(2).sum(dim=(0, 2))
    seg = enc["segment_ids"]
    valid = seg >= 0
    per_seq = g.new_zeros(int(enc["sequences"])).index_add(0, seg[valid], g.pow(2).sum(-1)[valid])
    return per_seq.reshape(-1, b).sum(0)


def wdpo_fd_backward(model: Any, o: dict[str, Any], value: Any, forward: Any, mb: dict[str, Any], rho: float,
                     step: float) -> Any:  # fmt: skip
    """WDPO's gradient by a finite difference (``train.wdpo_grad=finite_difference``): accumulates into the
    parameters' ``.grad`` the gradient of ``value + rho * c * sum_i ||g_i||^2``, where ``value = c * sum_i l_i``
    (the pointwise objective without its penalty) and ``g = d sum_i l_i / dz`` over the input embeddings z.
    Returns the per-sample penalties ``||g_i||^2`` (detached).

    ``d/dtheta ||g||^2 = 2 J^T g`` (J = dg/dtheta), and ``J^T g`` is the derivative of ``grad_theta sum l(z + e g)``
    at e = 0 (g held fixed). One backward gives the parameter gradient ``a = grad value`` and ``d = c g`` (z's
    gradient); a second forward-backward at ``z + s d``, with ``s = step * |z| / |d|``, gives ``grad value2``; then
    ``grad += (2 rho / (s c)) (grad value2 - a)``: no double backward, error O(s)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    embeds, losses = o["embeds"], o["losses"]
    (coef,) = torch.autograd.grad(value, losses, retain_graph=True)  # c per sample: 1/B for the pointwise mean
    c = float(coef[0])
    embeds.retain_grad()
    value.backward()
    d = embeds.grad.detach()
    a = [p.grad - b if b is not None else p.grad.clone() for p, b in zip(params, before, strict=True)]
    penalties = (sample_sq_norms(d, mb["enc"], losses.shape[0]) / c**2).to(losses.dtype)
    dn = float(d.norm())
    if dn == 0.0 or rho == 0.0:
        return penalties
    s = step * float(embeds.detach().norm()) / dn
    k = 2.0 * rho / (s * c)
    o2 = forward(mb, shift=(s * d).to(embeds.dtype))
    (k * (o2["losses"] * coef.detach()).sum()).backward()
    with torch.no_grad():
        for p, ai in zip(params, a, strict=True):
            p.grad.sub_(ai, alpha=k)
    return penalties


def objective_fn(cfg: dict[str, Any]) -> Any:
    """``F(losses, weights, penalties, group=, share=)`` for ``train.objective`` (the SFT loop uses erm)."""
    from raydora import robust

    t = cfg["train"]
    name = "erm" if cfg["mode"] == "sft" else t["objective"]

    def f(ls: Any, w: Any, pen: Any, **kw: Any) -> Any:
        if name == "erm":
            return robust.erm(ls, **kw)
        if name == "reweight":
            return robust.reweight(ls, w, **kw)
        if name == "kl_dro":
            return robust.kl_dro(ls, t["lam"], **kw)
        if name == "dora":
            return robust.dora(ls, w, t["lam"], calibration=t["dora_calibration"], **kw)
        if name == "kldpo":
            return robust.kldpo(ls, t["tau"], t["kldpo_normalize"], t["kldpo_clip"], **kw)
        if name == "dr_dpo":
            return robust.dr_dpo(ls, t["beta_prime"], **kw)
        return robust.wdpo(ls, pen, t["rho"], t["wdpo_mode"], **kw)

    return f


def objective_tilt(cfg: dict[str, Any], fsdp_step_sync: bool = False) -> Any:
    """The :class:`robust.Tilt` that accumulates ``train.objective`` over micro-batches in one pass, or None: the
    objective is linear or not a softmax tilt, ``train.accumulation`` is ``window``, or FSDP reduces once per step
    (``fsdp_step_sync``: the reduce-scatter inside the last backward mixes the ranks before the scale of a rank's
    share, which depends on the rows every rank has seen, is known)."""
    from raydora import robust

    t = cfg["train"]
    if cfg["mode"] == "sft" or t.get("accumulation", "online") != "online" or fsdp_step_sync:
        return None
    return robust.tilt_of(t["objective"], lam=t["lam"], calibration=t["dora_calibration"], tau=t["tau"],
                          normalize=t["kldpo_normalize"], clip=t["kldpo_clip"], beta_prime=t["beta_prime"])  # fmt: skip


def _is_linear(cfg: dict[str, Any]) -> bool:
    t = cfg["train"]
    return (
        cfg["mode"] == "sft"
        or t["objective"] in ("erm", "reweight")
        or (t["objective"] == "wdpo" and t["wdpo_mode"] == "pointwise")
    )


def effective_weights(f: Any, losses: Any, weights: Any, penalties: Any) -> Any:
    """``N * dF/dl_i`` at the global losses: the weight each row's loss gradient gets (1 for ERM)."""
    import torch

    x = losses.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x, weights, penalties), x)
    return g * x.shape[0]


# ---- the worker loop ---------------------------------------------------------------------------------------------
def _lr_lambda(total: int, warmup: int, kind: str) -> Any:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return fn


def make_optimizer(params: list[Any], lr: float, weight_decay: float, sharded: bool = False) -> Any:
    """AdamW; the fused kernel (one pass over every parameter, CPU and CUDA) unless FSDP shards the parameters,
    where torch picks its multi-tensor path."""
    import torch

    if sharded:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)


def _save_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, step: int, cfg: dict[str, Any], rank: int
) -> str | None:
    """Write a checkpoint folder (rank 0): ``model/`` (HF, safetensors) + ``state.pt`` (optimizer, scheduler, step)."""
    import torch

    from raydora import distributed

    lora = bool(cfg["train"]["lora_r"])
    # LoRA checkpoints hold the adapters only (the frozen base is the run's model_dir): megabytes, not the
    # model's size twice over. final/ holds the merged weights.
    state = distributed.full_state_dict(model, trainable_only=lora)
    opt_state = distributed.optimizer_state(model, optimizer)
    if rank != 0:
        return None
    out = Path(tempfile.mkdtemp(prefix="raydora-ckpt-"))
    if lora:
        from safetensors.torch import save_file

        # A PEFT adapter folder, written from the gathered state (the model's own parameters may be shards).
        _unwrap(model).save_pretrained(str(out / "adapter"), safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(str(out / "adapter"))
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / TRAINER_STATE))
    else:
        _save_model(model, tokenizer, out / "model", state)
    torch.save({"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict()}, out / "state.pt")
    (out / "step.json").write_text(json.dumps({"step": step}))
    return str(out)


def _merged_lora(peft_model: Any, state: dict[str, Any]) -> Any:
    """The plain model with the adapters merged, built on CPU from the gathered full ``state``, never from the live
    model: FSDP's sharded modules cannot be deep-copied, and a copy on the GPU would hold a second model at the end
    of a run. The frozen base keeps its dtype (bf16 under autocast); PEFT casts the delta to it. For saving only:
    non-persistent buffers (e.g. rotary ``inv_freq``) stay on the meta device."""
    import copy

    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    name = peft_model.active_adapter
    adapter = copy.deepcopy(peft_model.peft_config[name])  # PEFT edits the config it is given
    with torch.device("meta"):
        shell = get_peft_model(AutoModelForCausalLM.from_config(peft_model.get_base_model().config), adapter, name)
    # One process on CPU: the state's tensors are the live parameters, which the merge would add into.
    live = {p.data_ptr() for p in peft_model.parameters() if type(p).__name__ != "DTensor" and p.device.type == "cpu"}
    copies: dict[int, Any] = {}  # tied tensors stay one tensor
    own = {k: copies.setdefault(v.data_ptr(), v.clone()) if v.data_ptr() in live else v for k, v in state.items()}
    _, unexpected = shell.load_state_dict(own, assign=True, strict=False)  # missing: checked on meta below
    if unexpected:
        raise KeyError(f"merging the LoRA adapters: gathered state has unknown keys {unexpected[:5]}")
    # assign=True replaced tied parameters by separate ones: tie them again, so the saved model stays tied.
    shell.get_base_model().tie_weights()
    unset = [n for n, p in shell.named_parameters() if p.is_meta]
    if unset:
        raise KeyError(f"merging the LoRA adapters: no weights gathered for {unset[:5]}")
    # Merge each adapted layer on the device the adapters trained on, one layer at a time (the device holds one
    # layer more at most): a Ray worker has one CPU thread, which took about a minute for an 8B model's adapters
    # (~1 GFLOP and 117 MB of bf16 per MLP projection); a GPU merges them in seconds. The merged weights are
    # copied back into the CPU tensors they came from, so the host holds the state once, not twice. A layer the
    # device has no room for merges on CPU.
    device = next((p.device for p in peft_model.parameters() if p.requires_grad), torch.device("cpu"))
    for module in shell.modules():
        if isinstance(module, LoraLayer):
            host = {n: p.data for n, p in module.named_parameters()}
            try:
                module.to(device).merge(adapter_names=[name])
            except torch.cuda.OutOfMemoryError:
                module.to("cpu").merge(adapter_names=[name])
            for n, p in module.named_parameters():
                if p.data_ptr() != host[n].data_ptr():  # it went to the device and came back as a new tensor
                    host[n].copy_(p.data)
                    p.data = host[n]
    return shell.unload()


def _save_model(model: Any, tokenizer: Any, out: Path, state: dict[str, Any]) -> None:
    """``save_pretrained`` of the full (merged, unsharded) model."""
    from raydora.models import save_pretrained

    inner = _unwrap(model)
    if hasattr(inner, "merge_and_unload"):  # LoRA: save the merged weights, which transformers and vLLM load
        save_pretrained(_merged_lora(inner, state), tokenizer, out)
        return
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(inner.config)
        plain.load_state_dict(state, assign=True, strict=False)
        plain.tie_weights()  # assign=True replaced the tied parameters by separate copies
        save_pretrained(plain, tokenizer, out)
        return
    save_pretrained(inner, tokenizer, out)


def load_policy(
    model_dir: str | Path, amp: Any, master: Any, attn: str, lora_r: int = 0, lora_alpha: float = 16.0
) -> Any:
    """The policy to train: master weights in ``master`` (fp32), or with ``lora_r``, LoRA adapters (fp32) over a
    frozen base stored in the compute dtype ``amp`` (bf16 on GPUs: half the memory and no casts in every step, as
    PEFT and TRL users load it with dtype=bfloat16). The reference pass loads its weights the same way
    (``reference.ReferenceModel``), so the two agree at step 0."""
    import torch

    from raydora.models import load_causal_lm

    base = amp if lora_r and amp != torch.float32 else master
    model = load_causal_lm(model_dir, dtype=base, attn_implementation=attn)
    model.config.use_cache = False
    if lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear"))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(master)
    return model


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Ray Train worker: SFT (``cfg["mode"] == "sft"``) or robust preference optimisation."""
    import ray.train
    import torch
    import transformers
    from safetensors.torch import load_file

    from raydora import distributed
    from raydora.hardware import resolve_precision
    from raydora.models import load_tokenizer
    from raydora.tracking import Tracker

    transformers.utils.logging.disable_progress_bar()
    t = cfg["train"]
    ctx = distributed.train_context()
    rank, world = ctx["rank"], ctx["world_size"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    device = torch.device(f"cuda:{ctx['local_rank']}" if t["use_gpu"] else "cpu")
    if t["use_gpu"]:
        torch.cuda.set_device(device)
    _record_worker(Path(cfg["out_dir"]), rank, world, device)
    amp = resolve_precision(cfg["precision"], device.type)
    if t["objective"] == "wdpo" and t.get("wdpo_grad") == "finite_difference" and amp != torch.float32:
        # A difference of two gradients at a 1e-3 relative move: bf16 activations would round it away.
        raise ValueError(f"train.wdpo_grad=finite_difference needs fp32 (model.precision resolved to {amp})")
    master = getattr(torch, cfg.get("master_dtype", "float32"))
    tokenizer = load_tokenizer(cfg["model_dir"])
    model = load_policy(cfg["model_dir"], amp, master, cfg["attn_implementation"], t["lora_r"], t["lora_alpha"])
    model.to(device).train()
    if t["strategy"] == "fsdp" and world > 1:
        model = distributed.shard_fsdp(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg["lr"], t["weight_decay"], sharded=t["strategy"] == "fsdp" and world > 1)
    total = cfg["total_steps"]
    warmup = round(t["warmup_ratio"] * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, t["scheduler"]))

    start = 0
    # After a worker failure Ray Train hands back the group's latest checkpoint; a rerun of an interrupted stage
    # resumes from the newest one the driver found on storage.
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and cfg.get("resume_from"):
        ckpt = ray.train.Checkpoint.from_directory(cfg["resume_from"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            raw = Path(d) / TRAINER_STATE
            state = load_file(str(raw if raw.exists() else Path(d) / "model" / "model.safetensors"))
            distributed.load_full_state_dict(_unwrap(model), state, trainable_only=raw.exists())
            saved = torch.load(
                Path(d) / "state.pt", weights_only=True
            )  # tensors and numbers only: never unpickles code
            distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            start = int(saved["step"])
    group = distributed.default_group() if world > 1 else None
    tracker = None  # rank 0: metrics.jsonl, TensorBoard, and MLflow / W&B when the logging section asks
    if rank == 0:
        tracker = Tracker(Path(cfg["out_dir"]), start, cfg.get("tracking"), cfg.get("params"),
                          cfg.get("run_name", cfg["mode"]))  # fmt: skip
    f = objective_fn(cfg)
    local = cfg["batch_size"] // world
    mbs = cfg["micro_batch_size"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    multiple = cfg.get("pad_to_multiple_of", 0)
    wdpo = cfg["mode"] != "sft" and t["objective"] == "wdpo"
    dora = cfg.get("dora")
    fsdp = t["strategy"] == "fsdp" and world > 1
    shard = ray.train.get_dataset_shard(f"train_{rank}")
    skipped, last_metrics, step = 0, {}, start
    pack: bool | None = None
    tic = time.perf_counter()
    for rows in shard.iter_batches(batch_size=local, batch_format="numpy", prefetch_batches=2):
        steps = np.unique(rows["_step"])
        if len(steps) != 1 or len(rows["_step"]) != local:
            raise RuntimeError(f"worker {rank}: a batch spans steps {steps.tolist()} ({len(rows['_step'])} rows)")
        if int(steps[0]) < start:
            continue
        if int(steps[0]) != step:
            raise RuntimeError(f"worker {rank}: expected the rows of step {step}, got step {int(steps[0])}")
        if cfg.get("_fail_at_step") == step + 1 and rank == world - 1 and not Path(cfg["_fail_marker"]).exists():
            Path(cfg["_fail_marker"]).write_text("failed once")
            os._exit(1)  # an injected hard crash (tests): Ray Train restarts the group from the last checkpoint
        if pack is None:  # decided once, on the first batch
            pack = t.get("packing", False) and packing_supported(model, rows, cfg, pad, device, rank)
        micro = [
            collate_micro(rows, slice(i, i + mbs), cfg["mode"], t["loss"], pad, dora, pack, multiple)
            for i in range(0, local, mbs)
        ]
        for mb in micro:
            mb["enc"] = {k: v.to(device) for k, v in mb["enc"].items()}
        stats = _step(
            model, micro, cfg, f, group, world, device, amp, wdpo, fsdp, nan=cfg.get("_nan_at_step") == step + 1
        )
        finite = bool(torch.isfinite(stats["value"])) and math.isfinite(stats["grad_norm_pre"])
        if not finite:
            msg = (f"non-finite {'loss' if not torch.isfinite(stats['value']) else 'gradient'} at step {step + 1} "
                   f"(loss={float(stats['value'])}, grad norm={stats['grad_norm_pre']})")  # fmt: skip
            if t["nan_policy"] == "raise":
                if rank == 0:
                    (Path(cfg["out_dir"]) / FAILED_FILE).write_text(msg + "\n")
                ray.train.report({"step": step + 1, "failed": msg})
                if tracker is not None:
                    tracker.close(failed=True)
                return
            skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        else:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        toc = time.perf_counter()
        m = {"step": step, "epoch": (step - 1) // cfg["steps_per_epoch"], "lr": scheduler.get_last_lr()[0],
             "skipped_batches": skipped, "pairs_per_s": cfg["batch_size"] / (toc - tic),
             "tokens_per_s": stats["tokens"] / (toc - tic), **stats["metrics"]}  # fmt: skip
        tic = toc
        last_metrics = m
        if tracker is not None:
            tracker.log(m, step)
            if step % t["log_every"] == 0 or step == total:
                print(f"[{cfg['mode']}] step {step}/{total} loss {m['loss']:.4f} lr {m['lr']:.2e} "
                      f"grad {m['grad_norm']:.3f} {m['pairs_per_s']:.1f} rows/s", flush=True)  # fmt: skip
        if step % t["checkpoint_every"] == 0 or step == total:
            path = _save_checkpoint(model, optimizer, scheduler, tokenizer, step, cfg, rank)
            checkpoint = ray.train.Checkpoint.from_directory(path) if path else None
            ray.train.report(m, checkpoint=checkpoint)
            if path:
                shutil.rmtree(path, ignore_errors=True)
    if tracker is not None:
        tracker.close()
    state = distributed.full_state_dict(model)
    if rank == 0:
        _save_model(model, tokenizer, Path(cfg["out_dir"]) / "final", state)
        (Path(cfg["out_dir"]) / "final_metrics.json").write_text(json.dumps({**last_metrics, "steps": step}))
    distributed.barrier()


def _record_worker(out_dir: Path, rank: int, world: int, device: Any) -> None:
    """``workers/rank<r>.json``: the node, host and process each rank ran on (multi-node runs are checked with it)."""
    import socket

    import ray

    ctx = ray.get_runtime_context()
    info = {"rank": rank, "world_size": world, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(device)}  # fmt: skip
    folder = out_dir / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps(info) + "\n")


def packing_supported(model: Any, rows: dict[str, Any], cfg: dict[str, Any], pad: int, device: Any, rank: int) -> bool:
    """Does this model honour packed sequences (a block-diagonal mask from restarting position ids)? Checked
    once on real rows: packed and padded log-probs must agree, else training falls back to padding (a model that
    ignored the position ids would let packed sequences attend to each other)."""
    import torch

    from raydora.encoding import forward_logps

    n = min(4, len(rows["prompt_ids"]))
    dora = None
    padded = collate_micro(rows, slice(0, n), cfg["mode"], cfg["train"]["loss"], pad, dora, pack=False)
    packed = collate_micro(rows, slice(0, n), cfg["mode"], cfg["train"]["loss"], pad, dora, pack=True)
    was_training = model.training
    model.eval()  # no dropout noise in the comparison
    try:
        with torch.no_grad():
            a, _, _ = forward_logps(model, {k: v.to(device) for k, v in padded["enc"].items()}, padded["k"])
            b, _, _ = forward_logps(model, {k: v.to(device) for k, v in packed["enc"].items()}, packed["k"])
        ok = bool(torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-3))
    except Exception as e:  # noqa: BLE001 - a model that rejects position_ids without a mask
        ok, a, b = False, torch.zeros(1), torch.ones(1)
        print(f"[train] packed sequences unsupported by {type(_unwrap(model)).__name__} ({e}); padding instead")
    finally:
        model.train(was_training)
    if not ok and rank == 0:
        print(
            f"[train] packed log-probs differ from padded ones (max {float((a - b).abs().max()):.3g}): padding instead"
        )
    return ok


def _step(model: Any, micro: list[dict[str, Any]], cfg: dict[str, Any], f: Any, group: Any, world: int,
          device: Any, amp: Any, wdpo: bool, fsdp: bool, nan: bool = False) -> dict[str, Any]:  # fmt: skip
    """Forward/backward of one optimizer step over this worker's micro-batches; returns global metrics."""
    import torch

    from raydora import distributed, hardware, robust

    t = cfg["train"]
    autocast = hardware.autocast(device.type, amp)
    n_local = sum(mb["rows"] for mb in micro)
    b = cfg["batch_size"]

    fd = wdpo and t.get("wdpo_grad") == "finite_difference"  # the penalty's gradient by a finite difference

    def forward(mb: dict[str, Any], shift: Any = None) -> dict[str, Any]:
        with autocast:
            out = per_sample_losses(model, mb, cfg, embeddings=wdpo, embed_shift=shift)
        if nan:
            out["losses"] = out["losses"] * float("nan")
        w = mb.get("weights")
        out["weights"] = w.to(out["losses"].device) if w is not None else torch.ones_like(out["losses"]).detach()
        out["penalties"] = (
            wdpo_penalty(out["losses"], out["embeds"], mb["enc"])
            if wdpo and not fd
            else torch.zeros_like(out["losses"])
        )
        return out

    share_vectors, online = None, None
    coupled = len(micro) > 1 and not _is_linear(cfg)
    # FSDP reduce-scatters after every micro-batch (each rank keeps only its gradient shard) unless told to once.
    sync_each = fsdp and t.get("fsdp_grad_sync", "micro_batch") == "micro_batch"
    tilt = objective_tilt(cfg, fsdp and not sync_each) if coupled else None
    # The parameters whose .grad backward accumulates into, listed after each backward: a forward (even a no-grad
    # one before the step) leaves FSDP2's root unit with its unsharded parameters registered, while the reduced
    # gradients accumulate on the sharded ones, which every unit has registered again after a backward.
    params: list[Any] = []
    if tilt is not None:
        # One pass: an online softmax over the micro-batches (robust.OnlineTilt), rescaled once at the end. Under
        # FSDP the gradients are already averaged after each micro-batch, so the running max is shared (group).
        online = robust.OnlineTilt(tilt, lambda: [p.grad for p in params], group if sync_each else None)
    elif coupled:
        # First pass: the whole window's losses (no grad, except through WDPO's penalty), gathered once.
        cols = []
        for mb in micro:
            with torch.set_grad_enabled(wdpo):
                o = forward(mb)
            cols.append(torch.stack([o["losses"].detach(), o["weights"].detach(), o["penalties"].detach()], 1))
        gathered, offset = distributed.all_gather_varlen(torch.cat(cols), group)
        share_vectors = (gathered[:, 0], gathered[:, 1], gathered[:, 2], offset)
    elif len(micro) > 1:
        # Every worker holds batch_size / W rows (the plan's contiguous slices), so its offset is rank x rows.
        zeros = torch.zeros(b, dtype=torch.float64, device=device)
        share_vectors = (zeros, zeros, zeros, distributed.rank(group) * n_local)

    rows_seen, local_stats, tokens = 0, [], 0
    for i, mb in enumerate(micro):
        o = forward(mb)
        if online is not None:
            value = online.surrogate(o["losses"], o["weights"])
        elif share_vectors is None:
            value = f(o["losses"], o["weights"], o["penalties"], group=group)
        else:
            ls, ws, ps, offset = share_vectors
            share = robust.Share(ls, offset + rows_seen, ws, ps, world_size=world)
            value = f(o["losses"], o["weights"], o["penalties"], share=share)
        if fsdp:
            model.set_requires_gradient_sync(sync_each or i == len(micro) - 1)
        if fd:
            o["penalties"] = wdpo_fd_backward(model, o, value, forward, mb, t["rho"], t["wdpo_fd_step"])
        else:
            value.backward()
        params[:] = [p for p in model.parameters() if p.requires_grad]
        rows_seen += mb["rows"]
        tokens += int(o["tokens"])
        zero = torch.zeros_like(o["losses"])
        cols = [o["losses"], o["weights"], o["penalties"], o.get("chosen", zero), o.get("rejected", zero)]
        local_stats.append(torch.stack([c.detach() for c in cols], 1))
    stats, _ = distributed.all_gather_varlen(torch.cat(local_stats), group)
    if online is not None:
        online.finish(stats[:, 0], stats[:, 1], world)  # this rank's share of the global softmax, times W
    if not fsdp:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        distributed.all_reduce_mean_([p.grad for p in params], group)
    clip = t["grad_clip"] if t["grad_clip"] > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    tok = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
    distributed.all_reduce_mean_([tok], group)
    ls, ws, ps = stats[:, 0], stats[:, 1], stats[:, 2]
    value = f(ls, ws, ps)
    metrics = {"loss": float(value), "loss/unweighted": float(ls.mean()), "grad_norm": grad_norm}
    if cfg["mode"] != "sft":
        chosen, rejected = stats[:, 3], stats[:, 4]
        metrics.update({"rewards/chosen": float(chosen.mean()), "rewards/rejected": float(rejected.mean()),
                        "rewards/margins": float((chosen - rejected).mean()),
                        "rewards/accuracies": float((chosen > rejected).double().mean())})  # fmt: skip
        if torch.isfinite(ls).all():
            metrics.update(robust.weight_stats(effective_weights(f, ls, ws, ps).clamp_min(0)))
        if t["objective"] == "wdpo":
            metrics["robust/penalty"] = float(ps.mean())
    return {"value": value, "metrics": metrics, "grad_norm_pre": grad_norm, "tokens": float(tok) * world}


# ---- driver --------------------------------------------------------------------------------------------------------
def latest_checkpoint(out_dir: Path) -> tuple[int, Path | None]:
    """``(step, folder)`` of the newest complete checkpoint under ``out_dir/checkpoints`` (``(0, None)``: none)."""
    found = [(json.loads(p.read_text())["step"], p.parent) for p in (out_dir / "checkpoints").glob("*/step.json")]
    complete = lambda d: (d / "state.pt").is_file() and ((d / "model").is_dir() or (d / TRAINER_STATE).is_file())
    found = [(s, d) for s, d in found if complete(d)]
    return max(found, default=(0, None), key=lambda x: x[0])


def latest_step(out_dir: Path) -> int:
    """The step of the newest checkpoint under ``out_dir/checkpoints`` (0 when none)."""
    return latest_checkpoint(out_dir)[0]


def build_trainer(
    loop_cfg: dict[str, Any],
    datasets: dict[str, Any],
    *,
    num_workers: int,
    use_gpu: bool,
    out_dir: Path,
    max_failures: int,
    worker_cpus: float = 1,
    keep_checkpoints: int | None = None,
    placement_strategy: str = "PACK",
) -> Any:
    """The ``TorchTrainer``: ``num_workers`` workers (gloo on CPU, NCCL on GPU) running
    :func:`train_loop_per_worker`, one ordered dataset each, checkpoints under ``out_dir/checkpoints`` and
    ``max_failures`` automatic restarts from the latest checkpoint."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raydora.data import ordered_ingest

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": worker_cpus},
            placement_strategy=placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
        # Every worker reads its own ordered dataset: Train must neither split nor reorder them.
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ordered_ingest()),
        run_config=RunConfig(
            name="checkpoints",
            storage_path=str(out_dir),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )


# Keys that change where or how often things happen, not the trained weights: a rerun with new values resumes.
# accumulation, fsdp_grad_sync: the online softmax and the window pass, and FSDP reducing every micro-batch or once
# a step, compute the same gradient (to rounding).
NOT_IN_FINGERPRINT = (
    "placement_strategy",
    "keep_checkpoints",
    "log_every",
    "max_failures",
    "accumulation",
    "fsdp_grad_sync",
)


def fit(
    *,
    mode: str,
    data_dir: Path,
    model_dir: Path,
    out_dir: Path,
    run_cfg: Any,
    train: dict[str, Any],
    batch_size: int,
    micro_batch_size: int,
    num_workers: int,
    epochs: int,
    lr: float,
    extra: dict[str, Any] | None = None,
    force: bool = False,
) -> StageResult:
    """Train ``model_dir`` on ``data_dir`` into ``out_dir`` (``checkpoints/``, ``metrics.jsonl``, ``final/``)."""
    from raydora import tracking
    from raydora.config import to_dict
    from raydora.reference import attn_implementation

    t = run_cfg.train
    tracked = tracking.settings(getattr(run_cfg, "logging", None))  # fails here when a backend is not installed
    out_dir = Path(out_dir).absolute()
    same_result = {k: v for k, v in train.items() if k not in NOT_IN_FINGERPRINT}
    fp = fingerprint(mode, (read_success(data_dir) or {}).get("fingerprint"), file_fingerprints(model_dir),
                     same_result, batch_size, micro_batch_size, num_workers, epochs, lr, run_cfg.seed,
                     run_cfg.model.precision)  # fmt: skip
    if not force and is_done(out_dir, fp, on_corrupt=shutil.rmtree):  # corrupted: a fresh run, nothing resumed
        done = read_success(out_dir) or {}
        return StageResult(mode, {"final": str(out_dir / "final")}, done.get("rows", {}), skipped=True)
    marker = out_dir / "fingerprint.json"
    if out_dir.exists() and (force or not marker.exists() or json.loads(marker.read_text()).get("fingerprint") != fp):
        shutil.rmtree(out_dir)  # another config's checkpoints must not be resumed
    out_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fp}))
    (out_dir / FAILED_FILE).unlink(missing_ok=True)
    start, resume = latest_checkpoint(out_dir)
    plan = make_plan(data_dir, batch_size=batch_size, world=num_workers, epochs=epochs, seed=run_cfg.seed,
                     block_rows=t.shuffle_block_rows, max_steps=t.max_steps if mode == "train" else 0,
                     start_step=start)  # fmt: skip
    columns = ["prompt_ids", "response_ids"]
    from raydora.data import parquet_files

    schema = pq.read_schema(parquet_files(data_dir)[0])
    columns += [c for c in ("scores", "sources", "reference_logps", "p_golden") if c in schema.names]
    loop_cfg = {
        "mode": "sft" if mode == "sft" else "preference",
        "train": train,
        "model_dir": str(Path(model_dir).absolute()),
        "out_dir": str(out_dir),
        "seed": run_cfg.seed,
        "precision": run_cfg.model.precision,
        "attn_implementation": attn_implementation(run_cfg),
        "pad_to_multiple_of": run_cfg.model.pad_to_multiple_of,
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "lr": lr,
        "total_steps": plan.total_steps,
        "resume_from": str(resume) if resume else None,
        "steps_per_epoch": plan.steps_per_epoch,
        "threads": (extra or {}).get("threads", 1 if not t.use_gpu else 0),
        "tracking": tracked,
        "params": to_dict(run_cfg) if tracked else None,
        "run_name": f"{run_cfg.name}/{mode}",
        **(extra or {}),
    }
    if loop_cfg["mode"] == "preference" and train["objective"] in P_GOLDEN_OBJECTIVES:
        loop_cfg["dora"] = dora_info(run_cfg, data_dir)
        if "p_golden" not in columns:
            raise ValueError(
                f"train.objective={train['objective']} needs p_golden: run the classify stage before reference"
            )
    if t.use_gpu:  # Ray Train would wait forever for GPUs the cluster lacks
        check_gpus(num_workers, 1, "sft.num_workers" if mode == "sft" else "train.num_workers")
    datasets = worker_datasets(plan, seed=run_cfg.seed, columns=columns, start_step=start)
    trainer = build_trainer(loop_cfg, datasets, num_workers=num_workers, use_gpu=t.use_gpu, out_dir=out_dir,
                            max_failures=t.max_failures, worker_cpus=(extra or {}).get("worker_cpus", 1),
                            keep_checkpoints=train.get("keep_checkpoints"),
                            placement_strategy=train.get("placement_strategy", "PACK"))  # fmt: skip
    trainer.fit()
    failed = out_dir / FAILED_FILE
    if failed.exists():
        raise NonFiniteLossError(
            f"{mode}: {failed.read_text().strip()}; set train.nan_policy=skip to skip such batches"
        )
    final = json.loads((out_dir / "final_metrics.json").read_text())
    counts = {"rows": plan.rows, "steps": plan.total_steps}
    write_success(out_dir, {"stage": mode, "fingerprint": fp, "rows": counts, "metrics": final}, exclude=UNTRACKED)
    return StageResult(
        mode, {"final": str(out_dir / "final"), "metrics": str(out_dir / METRICS_FILE)}, counts, info=final
    )


def dora_info(cfg: Any, data_dir: Path) -> dict[str, Any]:
    """Source shares (from the scoring marker) and imbalance ratios (from the classifiers) for the DoRA weights."""
    run_dir = cfg.run_dir.absolute()
    scored = read_success(run_dir / "scored") or {}
    shares = dict(scored.get("shares") or {})
    gammas = {}
    for s in shares:
        cal = run_dir / "classifier" / s / "calibration.json"
        gammas[s] = json.loads(cal.read_text()).get("gamma", 1.0) if cal.exists() else 1.0
    if not shares:
        raise ValueError(f"{run_dir / 'scored'}: no source shares recorded; run the classify stage")
    return {"shares": shares, "gammas": gammas, "alpha": cfg.train.dora_alpha,
            "form": scored.get("form", "per_source")}  # fmt: skip


def run(cfg: Any, run_dir: str | Path, force: bool = False, **extra: Any) -> StageResult:
    """Pipeline stage ``train``: robust preference optimisation on ``reference/`` into ``train/``."""
    from raydora.reference import initial_policy

    run_dir = Path(run_dir).absolute()
    ref = run_dir / "reference"
    if read_success(ref) is None:
        raise FileNotFoundError(f"{ref}: no reference log-probs (_SUCCESS missing); run the reference stage first")
    t = cfg.train
    return fit(mode="train", data_dir=ref, model_dir=initial_policy(cfg, run_dir), out_dir=run_dir / "train",
               run_cfg=cfg, train=dataclasses.asdict(t), batch_size=t.batch_size, micro_batch_size=t.micro_batch_size,
               num_workers=t.num_workers, epochs=t.epochs, lr=t.lr, extra=extra or None, force=force)  # fmt: skip


# ---- SFT warm start ------------------------------------------------------------------------------------------------
# The TrainConfig keys the SFT loop reads (the rest are preference-only and must not invalidate a finished SFT).
SFT_TRAIN_KEYS = ("use_gpu", "placement_strategy", "weight_decay", "warmup_ratio", "scheduler", "grad_clip",
                  "checkpoint_every", "keep_checkpoints", "max_failures", "strategy", "shuffle_block_rows",
                  "log_every", "nan_policy")  # fmt: skip


def _sft_rows_from_synth(batch: dict[str, Any]) -> dict[str, Any]:
    n = len(batch["prompt"])
    return {"prompt": batch["prompt"], "responses": [[r] for r in batch["response"]],
            "scores": [[1.0]] * n, "sources": [[s] for s in batch["source"]]}  # fmt: skip


def _sft_rows_from_preferences(batch: pa.Table) -> pa.Table:
    """The best-scored response of each preference row, as a one-response row."""
    columns = ["prompt", "responses", "scores", "sources"]
    rows = batch.select(columns + [c for c in ("prompt_messages",) if c in batch.schema.names]).to_pylist()
    best = [int(np.argmax(r["scores"])) for r in rows]
    return pa.table({"prompt": [r["prompt"] for r in rows],
                     "responses": [[r["responses"][b]] for r, b in zip(rows, best, strict=True)],
                     "scores": [[1.0] for _ in rows],
                     "sources": [[r["sources"][b]] for r, b in zip(rows, best, strict=True)],
                     "prompt_messages": pa.array([r.get("prompt_messages") for r in rows], pa.string())})  # fmt: skip


def sft_corpus(cfg: Any, run_dir: Path) -> Path:
    """Tokenised SFT rows in ``sft_data/``: the benchmark's ``synth/sft`` corpus, else the best response of each
    row of ``data/``. Same tokenisation as preference training (``encoding.encode``)."""
    import ray.data

    from raydora.data import IO_CPUS, read_canonical, write_rows
    from raydora.reference import encode_rows, tokenizer_dir
    from raydora.rundir import promote, staging

    synth = run_dir / "synth" / "sft"
    source = synth if any(synth.glob("*.json")) else run_dir / "data"
    upstream = read_success(synth.parent if source == synth else source) or {}
    if not upstream:
        raise FileNotFoundError(f"{source}: no SFT corpus (run synth, or validate your data first)")
    tok = tokenizer_dir(cfg, run_dir)
    fp = fingerprint("sft_data", upstream.get("fingerprint"), file_fingerprints(tok), cfg.model.max_length,
                     *([f"prompt<={cfg.model.max_prompt_length}"] if cfg.model.max_prompt_length else []))  # fmt: skip
    out = run_dir / "sft_data"
    if is_done(out, fp):
        return out
    with staging(run_dir, "sft_corpus") as tmp:
        if source == synth:
            files = [str(f) for f in sorted(synth.glob("*.json"))]
            ds = ray.data.read_json(files, ray_remote_args={"num_cpus": IO_CPUS}).map_batches(
                _sft_rows_from_synth, batch_format="numpy", num_cpus=IO_CPUS
            )
        else:
            ds = read_canonical(source, num_cpus=IO_CPUS).map_batches(
                _sft_rows_from_preferences, batch_format="pyarrow", num_cpus=IO_CPUS
            )
        write_rows(ds, tmp / "rows")
        write_success(tmp / "rows", {"stage": "sft_corpus", "fingerprint": fp})
        encode_rows(tmp / "rows", tmp / "encoded", model_dir=None, tokenizer=tok, max_length=cfg.model.max_length,
                    cfg=cfg.reference, stage="sft_data", fp=fp,
                    max_prompt_length=cfg.model.max_prompt_length)  # fmt: skip
        promote(tmp / "encoded", out)
    return out


def run_sft(cfg: Any, run_dir: str | Path, force: bool = False, **extra: Any) -> StageResult:
    """Pipeline stage ``sft``: NLL warm start of ``model.policy`` on the SFT corpus into ``sft/final``."""
    from raydora.reference import base_policy

    run_dir = Path(run_dir).absolute()
    if not cfg.sft.enabled:
        return StageResult("sft", {}, {}, skipped=True, info={"reason": "sft.enabled=false"})
    data = sft_corpus(cfg, run_dir)
    s = cfg.sft
    train = {**{k: getattr(cfg.train, k) for k in SFT_TRAIN_KEYS}, "objective": "erm", "loss": "sft", "lora_r": 0,
             "lora_alpha": 16.0, "max_steps": 0}  # fmt: skip
    if s.checkpoint_every is not None:
        train["checkpoint_every"] = s.checkpoint_every
    return fit(mode="sft", data_dir=data, model_dir=base_policy(cfg, run_dir), out_dir=run_dir / "sft",
               run_cfg=cfg, train=train, batch_size=s.batch_size, micro_batch_size=s.micro_batch_size,
               num_workers=s.num_workers, epochs=s.epochs, lr=s.lr, extra=extra or None, force=force)  # fmt: skip
