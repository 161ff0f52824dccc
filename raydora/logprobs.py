"""Sequence log-probabilities from causal-LM logits."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sequence_logps", "token_counts", "token_logps"]


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
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    keep = mask[:, 1:].bool()
    targets = labels[:, 1:].masked_fill(~keep, 0).unsqueeze(-1)
    # gather - logsumexp == log_softmax at the target, without materialising a second [B, T, V] tensor.
    return torch.gather(logits, -1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1), keep


def token_counts(mask: Tensor) -> Tensor:
    """Number of tokens ``sequence_logps`` sums over: ``mask[:, 1:].sum(-1)``. ``mask [B, T]`` -> ``[B]`` (int64)."""
    return mask[:, 1:].sum(dim=-1).long()
