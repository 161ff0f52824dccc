"""Tokenisation, truncation, padding and the policy forward: the one place that turns preference rows into
sequence log-probs, shared by the reference pass and training so both see exactly the same tokens.

A response's sequence is ``prompt_ids + response_ids``:

- ``prompt_ids``: the prompt rendered with the tokenizer's chat template as one user turn plus the assistant
  header (``add_generation_prompt``), or the raw prompt text when the tokenizer has no template;
- ``response_ids``: the response text followed by EOS, so the policy learns to stop.

Truncation to ``max_length`` keeps the *end* of the prompt (at most ``max_length // 2`` tokens when the pair is
too long, as TRL's ``keep_end``) and then cuts the response's tail. Only response tokens count in the log-prob.
Batches are right-padded to their longest sequence, not to ``max_length``: no wasted padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raydora.logprobs import sequence_logps, token_counts, token_logps


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """The prompt as the model sees it: the chat template's user turn + assistant header, or the raw text."""
    if getattr(tokenizer, "chat_template", None):
        text: str = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text
    return prompt


def prompt_tokens(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's token ids as the policy sees them (:func:`render_prompt`, no special tokens added)."""
    ids: list[int] = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return ids


def encode(tokenizer: Any, prompt: str, responses: Sequence[str], max_length: int) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [response_ids per response])``, truncated so each ``prompt + response`` fits ``max_length``."""
    if max_length < 4:
        raise ValueError(f"max_length must be >= 4, got {max_length}")
    prompt_ids = prompt_tokens(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []) for r in responses]
    longest = max(len(r) for r in resp)
    if len(prompt_ids) + longest > max_length:
        # Keep the prompt's end (the question is usually last), leaving responses at least half the budget.
        keep = max(1, min(len(prompt_ids), max_length - min(longest, max_length - max_length // 2)))
        prompt_ids = prompt_ids[-keep:]
    room = max_length - len(prompt_ids)
    return list(prompt_ids), [list(r[:room]) for r in resp]


def encode_batch(
    tokenizer: Any, prompts: Sequence[str], responses: Sequence[Sequence[str]], max_length: int
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """:func:`encode` over rows."""
    out = [encode(tokenizer, p, r, max_length) for p, r in zip(prompts, responses, strict=True)]
    return [o[0] for o in out], [o[1] for o in out]


def pair_indices(scores: Sequence[Sequence[float]]) -> np.ndarray:
    """``[B, 2]``: the best and the worst response of each row by score (first on ties): a listwise row as a
    DPO pair. Pairwise rows (K = 2) give their chosen and rejected response."""
    out = np.zeros((len(scores), 2), dtype=np.int64)
    for i, s in enumerate(scores):
        a = np.asarray(s, dtype=np.float64)
        out[i] = (int(np.argmax(a)), int(np.argmin(a)))
    return out


def _sequences(
    prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[Sequence[int]]], select: np.ndarray
) -> tuple[list[list[int]], list[int]]:
    """``prompt + response`` token lists in k-major order (row ``k * B + i``), and where each response starts."""
    seqs, starts = [], []
    for j in range(select.shape[1]):
        for i in range(len(prompt_ids)):
            p = prompt_ids[i]
            seqs.append(list(p) + list(response_ids[i][int(select[i, j])]))
            starts.append(len(p))
    return seqs, starts


def round_up(n: int, multiple_of: int) -> int:
    """``n`` rounded up to a multiple of ``multiple_of`` (``n`` itself when ``multiple_of`` is 0)."""
    return -(-n // multiple_of) * multiple_of if multiple_of > 0 else n


def pad_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[Sequence[int]]],
    select: np.ndarray | None,
    pad_id: int,
    multiple_of: int = 0,
) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` ``[K * B, T]`` in **k-major** order: row
    ``k * B + i`` is response ``select[i, k]`` of row ``i`` (all responses when ``select`` is None, then every
    row needs the same K). ``T`` is the longest sequence of this batch, rounded up to a multiple of
    ``multiple_of`` when it is > 0. ``loss_mask`` marks response tokens."""
    b = len(prompt_ids)
    if select is None:
        ks = {len(r) for r in response_ids}
        if len(ks) != 1:
            raise ValueError(f"rows have different numbers of responses {sorted(ks)}; pass select")
        select = np.tile(np.arange(ks.pop()), (b, 1))
    seqs, starts = _sequences(prompt_ids, response_ids, select)
    t = round_up(max(len(s) for s in seqs), multiple_of)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for r, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[r, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attn[r, : len(s)] = 1
        loss_mask[r, start : len(s)] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[Sequence[int]]],
    select: np.ndarray,
    pad_id: int,
    capacity: int | None = None,
    multiple_of: int = 0,
) -> dict[str, Tensor]:
    """Padding-free layout of the same sequences as :func:`pad_sequences` (k-major, ``select`` as there): the
    sequences are packed first-fit-decreasing into rows of at most ``capacity`` tokens (default: twice the longest
    sequence, so two typical sequences share a row), ``position_ids`` restart
    at 0 for each, and ``segment_ids`` says which sequence (k-major index) each token belongs to (-1: padding).
    The rows' width is the fullest row's, rounded up to a multiple of ``multiple_of`` when it is > 0.

    transformers builds a block-diagonal causal mask from restarting ``position_ids`` when ``attention_mask`` is
    None, so a sequence only attends to itself: the log-probs equal the padded layout's, without computing the
    padding (on the benchmark's pairs a quarter of the padded tokens). Measured on CPU (``bench/``), the gain is
    small: attention with an explicit block mask costs more than the padding it saves on short sequences."""
    seqs, starts = _sequences(prompt_ids, response_ids, select)
    longest = max(len(s) for s in seqs)
    capacity = max(capacity or 2 * longest, longest)
    rows: list[list[int]] = []
    fill: list[int] = []
    for n in sorted(range(len(seqs)), key=lambda n: -len(seqs[n])):
        for r, used in enumerate(fill):
            if used + len(seqs[n]) <= capacity:
                rows[r].append(n)
                fill[r] += len(seqs[n])
                break
        else:
            rows.append([n])
            fill.append(len(seqs[n]))
    width = round_up(max(fill), multiple_of)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for n in members:
            s = seqs[n]
            ids[r, at : at + len(s)] = torch.as_tensor(s, dtype=torch.long)
            pos[r, at : at + len(s)] = torch.arange(len(s))
            seg[r, at : at + len(s)] = n
            loss_mask[r, at + starts[n] : at + len(s)] = 1
            at += len(s)
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "loss_mask": loss_mask,
            "attention_mask": (seg >= 0).long(), "sequences": torch.tensor(len(seqs))}  # fmt: skip


def packed_logps(logits: Tensor, labels: Tensor, mask: Tensor, segment_ids: Tensor, n: int) -> Tensor:
    """:func:`logprobs.sequence_logps` for a packed batch: per-sequence sums ``[n]`` of the masked tokens' log-probs.

    A sequence's first token is a prompt token (mask 0), so the logit that crosses a boundary never counts."""
    logps, keep = token_logps(logits, labels, mask)
    return logps.new_zeros(n).index_add(0, segment_ids[:, 1:][keep], logps[keep])


def forward_logps(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    k: int,
    *,
    embeddings: bool = False,
    embed_shift: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Policy log-probs of a :func:`pad_sequences` batch: ``(logps [B, K], lengths [B, K], inputs_embeds)``.

    ``embeddings=True`` feeds ``inputs_embeds`` (returned, grad-carrying) instead of ids, for WDPO's penalty
    (in the batch's own layout: padded rows, or packed rows whose ``segment_ids`` map tokens to sequences).
    ``lengths`` counts response tokens. Position ids follow the attention mask, so right padding changes
    nothing for the real tokens. ``embed_shift`` (with ``embeddings=True``) is added to the embeddings: WDPO's
    finite-difference pass."""
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    if "segment_ids" in batch:  # packed: no attention mask, the restarting position ids delimit the sequences
        n = int(batch["sequences"])
        packed_embeds = None
        if embeddings:
            get_emb = getattr(model, "get_input_embeddings", None) or model.module.get_input_embeddings
            packed_embeds = get_emb()(ids)
            if embed_shift is not None:
                packed_embeds = packed_embeds + embed_shift
            out = model(inputs_embeds=packed_embeds, position_ids=batch["position_ids"], use_cache=False)
        else:
            out = model(input_ids=ids, position_ids=batch["position_ids"], use_cache=False)
        logps = packed_logps(out.logits, ids, mask, batch["segment_ids"], n)
        seg = batch["segment_ids"][:, 1:][mask[:, 1:].bool()]
        lengths = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(
            0, seg, torch.ones_like(seg, dtype=logps.dtype)
        )
        return logps.reshape(k, n // k).T, lengths.reshape(k, n // k).T, packed_embeds
    embeds = None
    if embeddings:
        get_emb = getattr(model, "get_input_embeddings", None) or model.module.get_input_embeddings
        embeds = get_emb()(ids)
        if embed_shift is not None:
            embeds = embeds + embed_shift
        out = model(inputs_embeds=embeds, attention_mask=attn, use_cache=False)
    else:
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    logps = sequence_logps(out.logits, ids, mask)
    lengths = token_counts(mask).to(logps.dtype)
    b = ids.shape[0] // k
    return logps.reshape(k, b).T, lengths.reshape(k, b).T, embeds
