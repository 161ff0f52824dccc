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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from raydora.logprobs import chunked_target_logps, sequence_logps, token_counts, token_logps


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


# Causal LMs whose forward, in transformers 5.24, returns ``self.lm_head(hidden_states)`` as ``logits`` untouched when
# no labels are given (no softcapping, scaling or slicing after the head): the chunked log-probs may stand in for it.
CHUNKABLE = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2", "smollm3")
# Config keys of transforms applied to the logits after the head (Gemma 2/3, Cohere, Granite).
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling")
_refused: set[str] = set()
# model.logprob_chunk=auto: chunks of AUTO_CHUNK tokens (the fastest measured at 128k x 2,048) where the vocabulary is
# at least AUTO_MIN_VOCAB, where the chunks measured leaner (1.4-3.4x lower peak) and no slower on CPU
# (docs/benchmarks.md); below it, the full logits.
AUTO_CHUNK, AUTO_MIN_VOCAB = 1024, 32_000


def chunk_head(model: Any) -> tuple[torch.nn.Linear | None, str]:
    """``(output layer, "")`` when the chunked log-probs can stand in for the model's LM head, else ``(None, why)``.

    The HF model is found inside a DDP wrapper (``.module``) and a PEFT model (``get_base_model()``); an FSDP2 model
    is the HF model itself. Its head must be a plain ``Linear`` (not a LoRA-adapted one) whose output the model
    returns as its logits unchanged (:data:`CHUNKABLE`, no softcapping or scaling in the config)."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in CHUNKABLE:
        return None, f"model type {kind!r} is not known to return its head's output as the logits ({CHUNKABLE})"
    for key in _POST_HEAD:
        if getattr(config, key, None) not in (None, 1, 1.0):
            return None, f"config.{key} transforms the logits after the head"
    head, name = inner.get_output_embeddings(), type(inner).__name__
    if not isinstance(head, torch.nn.Linear):
        kind = f"{type(head).__module__}.{type(head).__qualname__}"
        return None, f"{name}'s output layer is a {kind}, not a plain torch Linear (a LoRA-adapted head?)"
    if "forward" in vars(head):
        return None, f"{name}'s output layer has its forward replaced already (an offloading hook?)"
    return head, ""


def resolve_chunk(model: Any, chunk: int | str) -> int:
    """``model.logprob_chunk`` for ``model``: an int as it is; ``auto``: :data:`AUTO_CHUNK` where
    :func:`chunk_head` allows chunks and the head has at least :data:`AUTO_MIN_VOCAB` outputs, else 0."""
    if chunk != "auto":
        return int(chunk)
    head, _ = chunk_head(model)
    return AUTO_CHUNK if head is not None and head.out_features >= AUTO_MIN_VOCAB else 0


@contextmanager
def _chunked_head(head: torch.nn.Linear, keep: Tensor, targets: Tensor, chunk: int) -> Iterator[list[Tensor]]:
    """While open, ``head`` maps hidden states ``[B, T, D]`` to the log-probs ``[N]`` of ``targets`` at the positions
    that count (``keep [B, T-1]``: ``hidden[:, t]`` predicts token ``t + 1``), by :func:`chunked_target_logps`,
    instead of the logits ``[B, T, V]``; yields the list its output is appended to. The call still goes through
    the module's ``__call__`` (FSDP2's hooks unshard ``head.weight`` first, DDP's and PEFT's see the same graph)."""
    out: list[Tensor] = []

    def forward(hidden: Tensor) -> Tensor:
        if hidden.shape[:2] != (keep.shape[0], keep.shape[1] + 1):
            raise RuntimeError(f"chunked log-probs: hidden states {tuple(hidden.shape)} do not match the batch")
        logps = chunked_target_logps(hidden[:, :-1][keep], head.weight, targets, head.bias, chunk)
        out.append(logps)
        return logps

    head.forward = forward  # type: ignore[method-assign,assignment]
    try:
        yield out
    finally:
        del head.forward


def _model_logps(model: torch.nn.Module, batch: dict[str, Tensor], chunk: int | str, **inputs: Any) -> Tensor:
    """``model(**inputs)``'s summed log-probs ``[n]`` of the tokens the batch's ``loss_mask`` counts, per sequence
    (a padded row, or a packed batch's segment). ``chunk > 0``: through the head in chunks of that many tokens
    (:func:`chunk_head`), never holding the ``[B, T, V]`` logits; else, or when the model does not allow it (said
    once per reason), from the full logits."""
    ids, mask, segments = batch["input_ids"], batch["loss_mask"], batch.get("segment_ids")
    chunk = resolve_chunk(model, chunk)
    head, why = chunk_head(model) if chunk > 0 else (None, "")
    if why and why not in _refused:
        _refused.add(why)
        print(f"[logprobs] model.logprob_chunk={chunk} ignored: {why}; computing the full logits", flush=True)
    if head is None:
        logits = model(**inputs, use_cache=False).logits
        if segments is None:
            return sequence_logps(logits, ids, mask)
        return packed_logps(logits, ids, mask, segments, int(batch["sequences"]))
    keep = mask[:, 1:].bool()
    with _chunked_head(head, keep, ids[:, 1:][keep], chunk) as calls:
        logits = model(**inputs, use_cache=False).logits
    if len(calls) != 1 or logits is not calls[0]:
        raise RuntimeError(
            f"{type(model).__name__} changed its head's output before returning it as the logits: the chunked "
            "log-probs cannot stand in for it; set model.logprob_chunk=0"
        )
    if segments is None:  # a padded row is its own sequence
        segments = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    n = ids.shape[0] if "sequences" not in batch else int(batch["sequences"])
    sums: Tensor = calls[0].new_zeros(n).index_add(0, segments[:, 1:][keep], calls[0])
    return sums


def forward_logps(
    model: torch.nn.Module,
    batch: dict[str, Tensor],
    k: int,
    *,
    embeddings: bool = False,
    embed_shift: Tensor | None = None,
    chunk: int | str = 0,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Policy log-probs of a :func:`pad_sequences` batch: ``(logps [B, K], lengths [B, K], inputs_embeds)``.

    ``embeddings=True`` feeds ``inputs_embeds`` (returned, grad-carrying) instead of ids, for WDPO's penalty
    (in the batch's own layout: padded rows, or packed rows whose ``segment_ids`` map tokens to sequences).
    ``lengths`` counts response tokens. Position ids follow the attention mask, so right padding changes
    nothing for the real tokens. ``embed_shift`` (with ``embeddings=True``) is added to the embeddings: WDPO's
    finite-difference pass. ``chunk`` (``model.logprob_chunk``, 0: off): the response tokens' log-probs come
    through the LM head ``chunk`` tokens at a time, without the ``[B, T, V]`` logits (:func:`chunk_head` says
    which models allow it; the others fall back to the full logits); ``auto``: :func:`resolve_chunk`."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    embeds = None
    if embeddings:
        embeds = _input_embeddings(model)(ids)
        if embed_shift is not None:
            embeds = embeds + embed_shift
    inputs: dict[str, Any] = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
    if "segment_ids" in batch:  # packed: no attention mask, the restarting position ids delimit the sequences
        logps = _model_logps(model, batch, chunk, position_ids=batch["position_ids"], **inputs)
        n = int(batch["sequences"])
        seg = batch["segment_ids"][:, 1:][mask[:, 1:].bool()]
        lengths = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(
            0, seg, torch.ones_like(seg, dtype=logps.dtype)
        )
        return logps.reshape(k, n // k).T, lengths.reshape(k, n // k).T, embeds
    logps = _model_logps(model, batch, chunk, attention_mask=batch["attention_mask"], **inputs)
    lengths = token_counts(mask).to(logps.dtype)
    b = ids.shape[0] // k
    return logps.reshape(k, b).T, lengths.reshape(k, b).T, embeds
