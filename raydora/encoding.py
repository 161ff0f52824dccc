"""Tokenisation, truncation, padding and the policy forward: the one place that turns preference rows into
sequence log-probs, shared by the reference pass and training so both see exactly the same tokens.

A response's sequence is ``prompt_ids + response_ids``:

- ``prompt_ids``: the prompt rendered once with the tokenizer's chat template (a conversational prompt's own turns,
  a plain prompt as one user turn) plus the assistant header (``add_generation_prompt``), or the canonical prompt
  text when the tokenizer has no template;
- ``response_ids``: the response text followed by EOS, so the policy learns to stop.

Truncation to ``model.max_length`` keeps the *end* of the prompt (at most ``model.max_prompt_length`` tokens, or,
when that is null and the pair is too long, what leaves the responses half the budget; TRL's ``keep_end``) and then
cuts each response's tail. Only response tokens count in the log-prob.
Batches are right-padded to their longest sequence, not to ``max_length``: no wasted padding.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raydora.logprobs import sequence_logps, token_counts, token_logps


def _turns(messages: str | Sequence[dict[str, str]] | None) -> list[dict[str, str]] | None:
    if messages is None or isinstance(messages, list):
        return messages
    if isinstance(messages, str):
        return list(json.loads(messages))
    return list(messages)


def render_prompt(tokenizer: Any, prompt: str, messages: str | Sequence[dict[str, str]] | None = None) -> str:
    """The prompt as the model sees it, rendered exactly once. A conversational prompt (``messages``: its turns, as
    the canonical ``prompt_messages`` JSON or a list) goes through the tokenizer's chat template with the assistant
    header; without a template its canonical text (``prompt``, already rendered at validate) is used as is. A plain
    prompt becomes the template's user turn + assistant header, or stays the raw text without a template."""
    turns = _turns(messages)
    if not getattr(tokenizer, "chat_template", None):
        return prompt
    text: str = tokenizer.apply_chat_template(
        turns or [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text


def prompt_tokens(tokenizer: Any, prompt: str, messages: str | Sequence[dict[str, str]] | None = None) -> list[int]:
    """The prompt's token ids as the policy sees them (:func:`render_prompt`, no special tokens added)."""
    ids: list[int] = tokenizer(render_prompt(tokenizer, prompt, messages), add_special_tokens=False)["input_ids"]
    return ids


def prompt_budget(max_length: int, longest_response: int, max_prompt_length: int | None = None) -> int:
    """Prompt tokens kept: ``max_prompt_length`` when set (TRL), else what the longest response leaves, but at most
    ``max_length - max_length // 2`` when the pair is too long (responses keep at least half the budget)."""
    if max_prompt_length is not None:
        return max_prompt_length
    return max(1, max_length - min(longest_response, max_length - max_length // 2))


def encode(
    tokenizer: Any,
    prompt: str,
    responses: Sequence[str],
    max_length: int,
    *,
    messages: str | Sequence[dict[str, str]] | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [response_ids per response])``, truncated so each ``prompt + response`` fits ``max_length``:
    the prompt keeps its end (:func:`prompt_budget` tokens at most), then each response is cut at the end."""
    prompt_ids, response_ids, _ = _encode(tokenizer, prompt, responses, max_length, messages, max_prompt_length)
    return prompt_ids, response_ids


def _encode(
    tokenizer: Any,
    prompt: str,
    responses: Sequence[str],
    max_length: int,
    messages: str | Sequence[dict[str, str]] | None,
    max_prompt_length: int | None,
) -> tuple[list[int], list[list[int]], bool]:
    if max_length < 4:
        raise ValueError(f"max_length must be >= 4, got {max_length}")
    prompt_ids = prompt_tokens(tokenizer, prompt, messages)
    eos = tokenizer.eos_token_id
    resp = [tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []) for r in responses]
    longest = max(len(r) for r in resp)
    full = len(prompt_ids)
    if max_prompt_length is not None or full + longest > max_length:
        # Keep the prompt's end (the question, or the last turn, is usually last).
        keep = min(full, prompt_budget(max_length, longest, max_prompt_length))
        prompt_ids = prompt_ids[full - keep :]
    room = max_length - len(prompt_ids)
    truncated = len(prompt_ids) < full or longest > room
    return list(prompt_ids), [list(r[:room]) for r in resp], truncated


def encode_batch(
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    max_length: int,
    *,
    messages: Sequence[str | None] | None = None,
    max_prompt_length: int | None = None,
    truncated: list[bool] | None = None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """:func:`encode` over rows (``messages``: each row's ``prompt_messages`` or None). ``truncated``, when given,
    receives whether each row lost tokens (its prompt's start or a response's end)."""
    turns = messages if messages is not None else [None] * len(prompts)
    ids, resp = [], []
    for p, r, m in zip(prompts, responses, turns, strict=True):
        p_ids, r_ids, cut = _encode(tokenizer, p, r, max_length, m, max_prompt_length)
        ids.append(p_ids)
        resp.append(r_ids)
        if truncated is not None:
            truncated.append(cut)
    return ids, resp


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
    return {
        "input_ids": ids,
        "position_ids": pos,
        "segment_ids": seg,
        "loss_mask": loss_mask,
        "attention_mask": (seg >= 0).long(),
        "sequences": torch.tensor(len(seqs)),
    }


def packed_logps(logits: Tensor, labels: Tensor, mask: Tensor, segment_ids: Tensor, n: int) -> Tensor:
    """:func:`logprobs.sequence_logps` for a packed batch: per-sequence sums ``[n]`` of the masked tokens' log-probs.

    A sequence's first token is a prompt token (mask 0), so the logit that crosses a boundary never counts."""
    logps, keep = token_logps(logits, labels, mask)
    return logps.new_zeros(n).index_add(0, segment_ids[:, 1:][keep], logps[keep])


def _input_embeddings(model: Any) -> Any:
    """The model's input embedding layer (inside a DDP wrapper too)."""
    inner = model if hasattr(model, "get_input_embeddings") else model.module
    return inner.get_input_embeddings()


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
            packed_embeds = _input_embeddings(model)(ids)
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
        embeds = _input_embeddings(model)(ids)
        if embed_shift is not None:
            embeds = embeds + embed_shift
        out = model(inputs_embeds=embeds, attention_mask=attn, use_cache=False)
    else:
        out = model(input_ids=ids, attention_mask=attn, use_cache=False)
    logps = sequence_logps(out.logits, ids, mask)
    lengths = token_counts(mask).to(logps.dtype)
    b = ids.shape[0] // k
    return logps.reshape(k, b).T, lengths.reshape(k, b).T, embeds
