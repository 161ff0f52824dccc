"""One optimizer step of preference (or SFT) training, free of Ray: collation, per-sample losses, the objective
over the global batch, WDPO's embedding gradients, and :func:`train_step`.

With one micro-batch the objective gathers the global losses directly (``group=``). With several, a linear
objective (erm, reweight, pointwise wdpo) needs nothing from the other rows; a log-sum-exp one (kl_dro, dora,
kldpo, dr_dpo) accumulates as an online softmax in one pass (``robust.OnlineTilt``); any other (wdpo global,
clipped kldpo, or any of them under ``train.accumulation=window`` or ``train.fsdp_grad_sync=step``) first runs a
no-grad pass over the window, gathers it once and then backpropagates each micro-batch against that fixed global
vector (``robust.Share``). Gradients are then averaged over workers (one coalesced all-reduce at the end of the
step, or FSDP2's reduce-scatter after every micro-batch) and clipped; the caller steps the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, TypedDict

import numpy as np

from raydora.config import PAIRWISE_LOSSES as PAIRWISE
from raydora.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What one optimizer step reads: the mode, the ``train`` section, and the batch shape. For SFT the recipe
    passes the ``train`` section with ``objective=erm`` (``mode="sft"`` makes the loss the response NLL).
    ``logprob_chunk``: ``model.logprob_chunk`` (``encoding.forward_logps``'s ``chunk``; 0: the full logits)."""

    mode: Literal["sft", "preference"]
    train: TrainConfig
    batch_size: int
    micro_batch_size: int
    logprob_chunk: int | str = 0  # or "auto": encoding.resolve_chunk

    @property
    def wdpo(self) -> bool:
        """WDPO's penalty needs the input embeddings' gradient."""
        return self.mode != "sft" and self.train.objective == "wdpo"


class DoraInfo(TypedDict):
    """The run's DoRA constants (``train.dora_info``): source shares pi_s, imbalance ratios gamma_s, the golden
    share alpha (None: 1/K) and the classifiers' form (``per_source`` or ``target_vs_mixture``)."""

    shares: dict[str, float]
    gammas: dict[str, float]
    alpha: float | None
    form: str


def _as_lists(col: Any) -> list[Any]:
    return [np.asarray(x).tolist() if not isinstance(x, list) else x for x in col]


def dora_row_weights(
    p_golden: list[list[float]], sources: list[list[str]], info: DoraInfo, select: np.ndarray | None = None
) -> np.ndarray:
    """h~ per row: the mean of ``robust.dora_weights`` over the responses the loss uses (shared/papers/dora.md):
    ``select[i]``, the chosen and rejected responses of a pairwise loss, or every response (``select=None``, and
    listwise losses). alpha stays 1/K of the whole row either way.

    A synthetic source's response uses its share pi_s and imbalance gamma_s; a golden or unknown response was
    scored against the whole mixture (``classify.mixture_p_golden``), so it uses pi = sum of the shares, gamma=1.
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
    dora: DoraInfo | None,
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
    model: Any, mb: dict[str, Any], cfg: StepConfig, *, embeddings: bool = False, embed_shift: Any = None
) -> dict[str, Any]:
    """Forward one micro-batch: per-sample losses ``[b]`` plus what metrics and WDPO need."""
    import torch

    from raydora import losses as L
    from raydora.encoding import forward_logps

    t, mode = cfg.train, cfg.mode
    logps, lengths, embeds = forward_logps(
        model, mb["enc"], mb["k"], embeddings=embeddings, embed_shift=embed_shift, chunk=cfg.logprob_chunk
    )
    logps, lengths = logps.double(), lengths.double()
    out: dict[str, Any] = {"embeds": embeds, "tokens": mb["enc"]["attention_mask"].sum()}
    if mode == "sft":
        out["losses"] = -(logps[:, 0] / lengths[:, 0].clamp_min(1))
        return out
    ref = mb["ref"].to(logps.device)
    scores = mb["scores"].to(logps.device)
    loss, beta = t.loss, t.beta
    if loss in PAIRWISE:
        pc, pr, rc, rr = logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1]
        if loss == "dpo":
            ls = L.dpo(pc, pr, rc, rr, beta)
        elif loss == "ipo":
            ls = L.ipo(pc, pr, rc, rr, beta)
        elif loss == "cdpo":
            ls = L.cdpo(pc, pr, rc, rr, beta, t.label_smoothing)
        elif loss == "rdpo":
            ls = L.rdpo(pc, pr, rc, rr, beta, t.flip_rate)
        else:
            ls = L.simpo(pc, pr, lengths[:, 0], lengths[:, 1], beta, t.simpo_gamma)
        best, worst = torch.zeros_like(pc, dtype=torch.long), torch.ones_like(pc, dtype=torch.long)
    else:
        if loss == "dpo_pl":
            ls = L.dpo_pl(logps, ref, scores, beta)
        elif loss == "rrhf":
            top = scores.argmax(-1, keepdim=True)
            nll = -(logps.gather(1, top) / lengths.gather(1, top).clamp_min(1)).squeeze(1)
            ls = L.rrhf(logps, lengths, scores) + t.sft_weight * nll
        else:
            ls = L.lire(logps, scores, t.lire_temperature)
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


def wdpo_fd_backward(
    model: Any, o: dict[str, Any], value: Any, forward: Any, mb: dict[str, Any], rho: float, step: float
) -> Any:
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


def objective_fn(cfg: StepConfig) -> Any:
    """``F(losses, weights, penalties, group=, share=)`` for ``train.objective`` (the SFT loop uses erm)."""
    from raydora import robust

    t = cfg.train
    name = "erm" if cfg.mode == "sft" else t.objective

    def f(ls: Any, w: Any, pen: Any, **kw: Any) -> Any:
        if name == "erm":
            return robust.erm(ls, **kw)
        if name == "reweight":
            return robust.reweight(ls, w, **kw)
        if name == "kl_dro":
            return robust.kl_dro(ls, t.lam, **kw)
        if name == "dora":
            return robust.dora(ls, w, t.lam, calibration=t.dora_calibration, **kw)
        if name == "kldpo":
            return robust.kldpo(ls, t.tau, t.kldpo_normalize, t.kldpo_clip, **kw)
        if name == "dr_dpo":
            return robust.dr_dpo(ls, t.beta_prime, **kw)
        return robust.wdpo(ls, pen, t.rho, t.wdpo_mode, **kw)

    return f


def objective_tilt(cfg: StepConfig, fsdp_step_sync: bool = False) -> Any:
    """The :class:`robust.Tilt` that accumulates ``train.objective`` over micro-batches in one pass, or None: the
    objective is linear or not a softmax tilt, ``train.accumulation`` is ``window``, or FSDP reduces once per step
    (``fsdp_step_sync``: the reduce-scatter inside the last backward mixes the ranks before the scale of a rank's
    share, which depends on the rows every rank has seen, is known)."""
    from raydora import robust

    t = cfg.train
    if cfg.mode == "sft" or t.accumulation != "online" or fsdp_step_sync:
        return None
    return robust.tilt_of(
        t.objective,
        lam=t.lam,
        calibration=t.dora_calibration,
        tau=t.tau,
        normalize=t.kldpo_normalize,
        clip=t.kldpo_clip,
        beta_prime=t.beta_prime,
    )


def _is_linear(cfg: StepConfig) -> bool:
    t = cfg.train
    return (
        cfg.mode == "sft"
        or t.objective in ("erm", "reweight")
        or (t.objective == "wdpo" and t.wdpo_mode == "pointwise")
    )


def effective_weights(f: Any, losses: Any, weights: Any, penalties: Any) -> Any:
    """``N * dF/dl_i`` at the global losses: the weight each row's loss gradient gets (1 for ERM)."""
    import torch

    x = losses.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(x, weights, penalties), x)
    return g * x.shape[0]


def packing_supported(model: Any, rows: dict[str, Any], cfg: StepConfig, pad: int, device: Any, rank: int) -> bool:
    """Does this model honour packed sequences (a block-diagonal mask from restarting position ids)? Checked
    once on real rows: packed and padded log-probs must agree, else training falls back to padding (a model that
    ignored the position ids would let packed sequences attend to each other)."""
    import torch

    from raydora.encoding import forward_logps

    n = min(4, len(rows["prompt_ids"]))
    dora = None
    padded = collate_micro(rows, slice(0, n), cfg.mode, cfg.train.loss, pad, dora, pack=False)
    packed = collate_micro(rows, slice(0, n), cfg.mode, cfg.train.loss, pad, dora, pack=True)
    was_training = model.training
    model.eval()  # no dropout noise in the comparison
    try:
        with torch.no_grad():
            c = cfg.logprob_chunk
            a, _, _ = forward_logps(model, {k: v.to(device) for k, v in padded["enc"].items()}, padded["k"], chunk=c)
            b, _, _ = forward_logps(model, {k: v.to(device) for k, v in packed["enc"].items()}, packed["k"], chunk=c)
        ok = bool(torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-3))
    except Exception as e:  # noqa: BLE001 - a model that rejects position_ids without a mask
        ok, a, b = False, torch.zeros(1), torch.ones(1)
        name = type(getattr(model, "module", model)).__name__
        print(f"[train] packed sequences unsupported by {name} ({e}); padding instead")
    finally:
        model.train(was_training)
    if not ok and rank == 0:
        print(
            f"[train] packed log-probs differ from padded ones (max {float((a - b).abs().max()):.3g}): padding instead"
        )
    return ok


def train_step(
    model: Any,
    micro: list[dict[str, Any]],
    cfg: StepConfig,
    *,
    group: Any = None,
    world: int = 1,
    device: Any = None,
    amp: Any = None,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Forward and backward of one optimizer step over this worker's micro-batches (``collate_micro``), leaving
    the global batch's gradient, averaged over the ``world`` workers of ``group`` and clipped, in ``.grad``.
    ``amp``: the autocast dtype (default fp32, none); ``fsdp``: the model is FSDP2-sharded. Returns
    ``{"value", "metrics", "grad_norm_pre", "tokens"}`` (the global objective, the step's metrics, the gradient
    norm before clipping, and the global batch's tokens)."""
    import torch

    from raydora import distributed, hardware, robust

    device = torch.device("cpu") if device is None else device
    amp = torch.float32 if amp is None else amp
    t = cfg.train
    f = objective_fn(cfg)
    wdpo = cfg.wdpo
    autocast = hardware.autocast(device.type, amp)
    n_local = sum(mb["rows"] for mb in micro)
    b = cfg.batch_size

    fd = wdpo and t.wdpo_grad == "finite_difference"  # the penalty's gradient by a finite difference

    def forward(mb: dict[str, Any], shift: Any = None) -> dict[str, Any]:
        with autocast:
            out = per_sample_losses(model, mb, cfg, embeddings=wdpo, embed_shift=shift)
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
    sync_each = fsdp and t.fsdp_grad_sync == "micro_batch"
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
            o["penalties"] = wdpo_fd_backward(model, o, value, forward, mb, t.rho, t.wdpo_fd_step)
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
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    tok = torch.tensor([float(tokens)], dtype=torch.float64, device=device)
    distributed.all_reduce_mean_([tok], group)
    ls, ws, ps = stats[:, 0], stats[:, 1], stats[:, 2]
    value = f(ls, ws, ps)
    metrics = {"loss": float(value), "loss/unweighted": float(ls.mean()), "grad_norm": grad_norm}
    if cfg.mode != "sft":
        chosen, rejected = stats[:, 3], stats[:, 4]
        metrics.update(
            {
                "rewards/chosen": float(chosen.mean()),
                "rewards/rejected": float(rejected.mean()),
                "rewards/margins": float((chosen - rejected).mean()),
                "rewards/accuracies": float((chosen > rejected).double().mean()),
            }
        )
        if torch.isfinite(ls).all():
            metrics.update(robust.weight_stats(effective_weights(f, ls, ws, ps).clamp_min(0)))
        if t.objective == "wdpo":
            metrics["robust/penalty"] = float(ps.mean())
    return {"value": value, "metrics": metrics, "grad_norm_pre": grad_norm, "tokens": float(tok) * world}
