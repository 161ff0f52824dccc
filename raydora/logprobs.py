"""Sequence log-probabilities from causal-LM logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["chunked_target_logps", "sequence_logps", "token_counts", "token_logps"]


def sequence_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``log p(label_t | <t)`` over masked tokens. ``logits [B, T, V]``, ``labels, mask [B, T]`` -> ``[B]``.

    The causal shift is applied inside: ``logits[:, t]`` scores ``labels[:, t + 1]``, and ``mask[:, t + 1]`` says
    whether that token counts (1 on response tokens, 0 on prompt and padding). Masked labels may hold anything,
    ``-100`` included. Half-precision logits are upcast to float32, so bf16 training gets fp32 log-probs.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] and labels, mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    logps, keep = token_logps(logits, labels, mask)
    # where(), not a product: a -inf logit at a masked position must not turn into NaN.
    return torch.where(keep, logps, torch.zeros_like(logps)).sum(dim=-1)


def token_logps(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token ``log p(label_{t+1} | <=t)`` ``[B, T-1]`` and the boolean mask of the tokens that count, with the
    causal shift applied (the building block of :func:`sequence_logps`; masked entries hold garbage)."""
    logits = _upcast(logits[:, :-1])
    keep = mask[:, 1:].bool()
    targets = labels[:, 1:].masked_fill(~keep, 0).unsqueeze(-1)
    # gather - logsumexp == log_softmax at the target, without materialising a second [B, T, V] tensor.
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1), keep


def token_counts(mask: Tensor) -> Tensor:
    """Number of tokens ``sequence_logps`` sums over: ``mask[:, 1:].sum(-1)``. ``mask [B, T]`` -> ``[B]`` (int64)."""
    return mask[:, 1:].sum(dim=-1).long()


class _ChunkedTargetLogps(torch.autograd.Function):
    """``log_softmax(hidden @ weight.T + bias)[targets]`` a chunk of rows at a time; the backward recomputes each
    chunk's logits instead of keeping them, so neither pass holds more than ``[chunk, V]`` logits."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        w = weight.to(hidden.dtype)  # once per call, as autocast casts a layer's weight once
        b = bias.to(hidden.dtype) if bias is not None else None
        out = hidden.new_empty(hidden.shape[0], dtype=_acc(hidden.dtype))
        lse = torch.empty_like(out)
        for s in range(0, hidden.shape[0], chunk):
            logits = _upcast(torch.nn.functional.linear(hidden[s : s + chunk], w, b))
            lse[s : s + chunk] = logits.logsumexp(-1)
            out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk = chunk
        # The backward runs outside autocast: it re-enters the forward's, so the logits it recomputes are the same
        # (bf16) logits that ``lse`` was taken from, as torch.amp.custom_bwd does for a fixed device type.
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        device, enabled, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            return _ChunkedTargetLogps._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]  # a frozen head (LoRA): no V x D work
        if torch.is_grad_enabled():  # create_graph: a differentiable backward (WDPO's double backward)
            return _backward_differentiable(hidden, weight, bias, targets, grad, ctx.chunk, need_w, need_b)
        w = weight.to(hidden.dtype)
        b = bias.to(hidden.dtype) if bias is not None else None
        acc = _acc(hidden.dtype)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk, None]
            g = grad[s : s + ctx.chunk, None].to(acc)
            # d logp_t / d logits = onehot(t) - softmax(logits), times the upstream gradient; in place, one buffer.
            d = _upcast(torch.nn.functional.linear(h, w, b))
            d.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-g).scatter_add_(-1, t, g)
            dh = d.to(hidden.dtype)
            torch.mm(dh, w, out=grad_h[s : s + ctx.chunk])
            if grad_w is not None:
                grad_w.addmm_(d.T, h.to(acc))
            if grad_b is not None:
                grad_b.add_(d.sum(0))
        gw = grad_w.to(weight.dtype) if grad_w is not None else None
        gb = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
        return grad_h, gw, gb, None, None


def _backward_differentiable(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    grad: Tensor,
    chunk: int,
    need_w: bool = True,
    need_b: bool = True,
) -> tuple[Tensor | None, ...]:
    """The same gradients, out of place, so autograd records them for a second derivative."""
    w = weight.to(hidden.dtype)
    b = bias.to(hidden.dtype) if bias is not None else None
    acc = _acc(hidden.dtype)
    grad_h = []
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if bias is not None and need_b else None
    for s in range(0, hidden.shape[0], chunk):
        h = hidden[s : s + chunk]
        logits = _upcast(torch.nn.functional.linear(h, w, b))
        g = grad[s : s + chunk, None].to(acc)
        d = (-torch.softmax(logits, -1) * g).scatter_add(-1, targets[s : s + chunk, None], g)
        grad_h.append((d.to(hidden.dtype) @ w).to(hidden.dtype))
        if grad_w is not None:
            grad_w = grad_w + d.T @ h.to(acc)
        if grad_b is not None:
            grad_b = grad_b + d.sum(0)
    gh = torch.cat(grad_h) if grad_h else torch.zeros_like(hidden)
    gw = grad_w.to(weight.dtype) if grad_w is not None else None
    gb = grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None
    return gh, gw, gb, None, None


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The log-softmax's dtype: float32 for half precisions (as :func:`token_logps` upcasts), else the input's."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _upcast(logits: Tensor) -> Tensor:
    return logits.to(_acc(logits.dtype))


def chunked_target_logps(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, chunk_size: int = 1024
) -> Tensor:
    """``log p(target_i)`` of each row under the output layer ``weight [V, D]`` (and ``bias [V]``), from the last
    hidden states ``hidden [N, D]`` of the tokens that count and their next tokens ``targets [N]``, without ever
    holding the ``[N, V]`` logits: ``chunk_size`` rows at a time, forward and backward (which recomputes each
    chunk's logits). Equal to ``log_softmax(hidden @ weight.T + bias)[targets]`` (computed as :func:`token_logps`
    does: logits in ``hidden``'s dtype, the log-softmax in float32 for half precisions); gradients reach
    ``hidden``, ``weight`` and ``bias``, and the backward is itself differentiable (WDPO's double backward).
    Returns ``[N]`` in float32 (half precisions) or ``hidden``'s dtype."""
    if hidden.dim() != 2 or weight.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"expected hidden [N, D], weight [V, D], targets [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out: Tensor = _ChunkedTargetLogps.apply(hidden, weight, bias, targets.long(), chunk_size)  # type: ignore[no-untyped-call]
    return out
