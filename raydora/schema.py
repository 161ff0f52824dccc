"""The canonical listwise schema, the input layouts converted into it, and row validation.

Pure (stdlib only), so every rule is unit-testable without Ray. A record either becomes a canonical row
(``id, prompt, responses, scores, sources`` plus pass-through ``split``, ``meta``) or raises :class:`RowError`
with a named ``reason`` and the ``field`` at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

CANONICAL_COLUMNS = ("id", "prompt", "responses", "scores", "sources", "split", "meta", "prompt_messages")
FORMATS = ("canonical", "trl", "trl_conversational", "trl_implicit", "rrhf")
UNKNOWN_SOURCE = "unknown"
LAYOUT_KEYS = {  # the fields that identify each layout
    "canonical": {"prompt", "responses", "scores"},
    "rrhf": {"query", "responses", "scores"},
    "trl": {"prompt", "chosen", "rejected"},
    "trl_conversational": {"prompt", "chosen", "rejected"},
    "trl_implicit": {"chosen", "rejected"},
}

# reason -> what it means (docs/data.md lists the same table)
REASONS = {
    "malformed_json": "the line (or file) is not valid JSON",
    "invalid_utf8": "the bytes are not UTF-8, or a string holds an unpaired surrogate",
    "blank_line": "an empty or whitespace-only line inside a JSONL file",
    "not_an_object": "the JSON value is not an object (a list, number, string, ...)",
    "unknown_format": "the columns match no known layout (canonical, TRL, RRHF)",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "empty_text": "the prompt or a response is empty or whitespace",
    "too_few_responses": "fewer than 2 responses (K < 2)",
    "length_mismatch": "responses, scores and sources have different lengths",
    "nonfinite_score": "a score is NaN or infinite",
    "tied_scores": "all scores are equal: no preference",
    "over_length": "prompt + responses exceed data.max_chars characters, or (data.truncation=drop) model.max_length "
    "tokens (prompt: model.max_prompt_length)",
    # a file-level reason: the rest of a compressed file could not be decompressed (truncated or damaged)
    "corrupt_file": "a compressed file cannot be decompressed from this line on (truncated or damaged)",
}

ChatRenderer = Callable[[list[dict[str, str]]], str]


class RowError(ValueError):
    """A record that cannot become a canonical row: ``reason`` (a key of REASONS), ``field`` and a detail."""

    def __init__(self, reason: str, field: str = "", detail: str = "") -> None:
        assert reason in REASONS, reason
        self.reason, self.field, self.detail = reason, field, detail
        super().__init__(f"{reason}" + (f" [{field}]" if field else "") + (f": {detail}" if detail else ""))


def detect_format(columns: Sequence[str] | Mapping[str, Any]) -> str | None:
    """Guess the layout from a record's keys (or a table's column names); None when nothing matches.

    For TRL pairs with a prompt, the prompt's *type* decides between ``trl`` and ``trl_conversational``, so pass
    the record itself where you can."""
    keys = set(columns)
    if {"prompt", "responses", "scores"} <= keys:
        return "canonical"
    if {"query", "responses"} <= keys:
        return "rrhf"
    if {"chosen", "rejected"} <= keys:
        if "prompt" not in keys:
            return "trl_implicit"
        if isinstance(columns, Mapping) and isinstance(columns.get("prompt"), list):
            return "trl_conversational"
        return "trl"
    return None


def default_chat_renderer(messages: list[dict[str, str]]) -> str:
    """The text of a conversational prompt in the canonical ``prompt`` column: ``<|role|>\\ncontent\\n`` per turn,
    then ``<|assistant|>\\n``. The turns themselves are kept in ``prompt_messages``, and the policy sees them
    rendered once, by its own tokenizer's chat template (``encoding.render_prompt``)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def row_id(prompt: str, responses: Sequence[str]) -> str:
    """Stable id: a hash of the prompt and the responses (order matters)."""
    h = hashlib.sha256(json.dumps([prompt, list(responses)], ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:20]


def _require(record: Mapping[str, Any], field: str) -> Any:
    if record.get(field) is None:
        raise RowError("missing_field", field, f"'{field}' is required")
    return record[field]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError("wrong_type", field, f"expected text, got {type(value).__name__}")
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise RowError("wrong_type", field, "expected a list of {role, content} messages")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _assistant_text(messages: list[dict[str, str]], field: str) -> str:
    """A completion given as messages: the concatenated assistant turns."""
    parts = [m["content"] for m in messages if m["role"] == "assistant"]
    if not parts:
        raise RowError("missing_field", field, "no assistant message in the completion")
    return "\n".join(parts)


def _split_implicit(
    chosen: Any, rejected: Any, render: ChatRenderer
) -> tuple[list[dict[str, str]] | None, str, str, str]:
    """TRL's implicit prompt: the shared prefix of chosen and rejected is the prompt. Returns the prompt's turns
    (None for plain text), the prompt text, and the two responses."""
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        if n == 0:
            raise RowError("missing_field", "prompt", "chosen and rejected share no prompt turns")
        return c[:n], render(c[:n]), _assistant_text(c[n:], "chosen"), _assistant_text(r[n:], "rejected")
    ct, rt = _text(chosen, "chosen"), _text(rejected, "rejected")
    n = 0
    while n < min(len(ct), len(rt)) and ct[n] == rt[n]:
        n += 1
    # Cut back to a whitespace boundary, so a shared first letter of both answers stays in the answers.
    while n > 0 and not ct[n - 1].isspace():
        n -= 1
    if n == 0:
        raise RowError("missing_field", "prompt", "chosen and rejected share no prompt prefix")
    return None, ct[:n], ct[n:], rt[n:]


def to_canonical(record: Mapping[str, Any], fmt: str, render: ChatRenderer = default_chat_renderer) -> dict[str, Any]:
    """Convert one record in layout ``fmt`` into an (unvalidated) canonical row. Raises RowError."""
    extra = {k: record.get(k) for k in ("split", "meta") if record.get(k) is not None}
    if fmt in ("canonical", "rrhf"):
        key = "prompt" if fmt == "canonical" else "query"
        prompt, messages = _require(record, key), record.get("prompt_messages")
        if isinstance(prompt, list):  # a conversational prompt: its turns are kept, its text rendered for display
            messages = _messages(prompt, key)
            prompt = render(messages)
        elif isinstance(messages, str):  # canonical rows written by raydora carry the turns as JSON text
            try:
                messages = json.loads(messages)
            except ValueError:
                raise RowError("wrong_type", "prompt_messages", "not a JSON list of messages") from None
        return {
            "id": record.get("id"),
            "prompt": prompt,
            "responses": _require(record, "responses"),
            "scores": _require(record, "scores"),
            "sources": record.get("sources"),
            "prompt_messages": messages,
            **extra,
        }
    chosen, rejected = _require(record, "chosen"), _require(record, "rejected")
    messages = None
    if fmt == "trl":
        prompt = _require(record, "prompt")
        responses = [_text(chosen, "chosen"), _text(rejected, "rejected")]
    elif fmt == "trl_conversational":
        messages = _messages(_require(record, "prompt"), "prompt")
        prompt = render(messages)
        responses = [
            _assistant_text(_messages(chosen, "chosen"), "chosen"),
            _assistant_text(_messages(rejected, "rejected"), "rejected"),
        ]
    elif fmt == "trl_implicit":
        messages, prompt, *responses = _split_implicit(chosen, rejected, render)
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    sources = [record.get("chosen_source"), record.get("rejected_source")]
    return {
        "id": record.get("id"),
        "prompt": prompt,
        "responses": responses,
        "scores": [1.0, 0.0],
        "sources": sources if all(isinstance(s, str) for s in sources) else None,
        "prompt_messages": messages,
        **extra,
    }


def _utf8(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RowError("invalid_utf8", field, str(e)) from None


def validate(row: Mapping[str, Any], max_chars: int) -> dict[str, Any]:
    """Check a canonical row and return it normalised (float scores, default sources and id, meta as JSON text)."""
    prompt = _text(row.get("prompt"), "prompt")
    responses, scores = row.get("responses"), row.get("scores")
    if not isinstance(responses, list):
        raise RowError("wrong_type", "responses", f"expected a list, got {type(responses).__name__}")
    if not isinstance(scores, list):
        raise RowError("wrong_type", "scores", f"expected a list, got {type(scores).__name__}")
    sources = row.get("sources")
    if sources is None:
        sources = [UNKNOWN_SOURCE] * len(responses)
    if not isinstance(sources, list):
        raise RowError("wrong_type", "sources", f"expected a list, got {type(sources).__name__}")
    for i, r in enumerate(responses):
        _text(r, f"responses[{i}]")
    for i, s in enumerate(sources):
        _text(s, f"sources[{i}]")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise RowError("wrong_type", f"scores[{i}]", f"expected a number, got {s!r}")
    for field, text in [("prompt", prompt), *((f"responses[{i}]", r) for i, r in enumerate(responses))]:
        _utf8(text, field)
        if not text.strip():
            raise RowError("empty_text", field, "empty or whitespace-only text")
    if len(responses) < 2:
        raise RowError("too_few_responses", "responses", f"K = {len(responses)}")
    if not len(responses) == len(scores) == len(sources):
        raise RowError(
            "length_mismatch",
            "scores" if len(scores) != len(responses) else "sources",
            f"{len(responses)} responses, {len(scores)} scores, {len(sources)} sources",
        )
    floats = [float(s) for s in scores]
    for i, s in enumerate(floats):
        if not math.isfinite(s):
            raise RowError("nonfinite_score", f"scores[{i}]", repr(s))
    if len(set(floats)) == 1:
        raise RowError("tied_scores", "scores", f"all {len(floats)} scores equal {floats[0]}")
    size = len(prompt) + sum(len(r) for r in responses)
    if size > max_chars:
        raise RowError("over_length", "responses", f"{size} characters > max_chars={max_chars}")
    rid = row.get("id")
    if rid is not None and not isinstance(rid, (str, int)):
        raise RowError("wrong_type", "id", f"expected text or an integer, got {type(rid).__name__}")
    split, meta = row.get("split"), row.get("meta")
    if split is not None and not isinstance(split, str):
        raise RowError("wrong_type", "split", f"expected text, got {type(split).__name__}")
    try:
        meta_text = None if meta is None else json.dumps(meta, ensure_ascii=False, allow_nan=True)
        if meta_text is not None:
            _utf8(meta_text, "meta")
    except (TypeError, ValueError) as e:
        raise RowError("wrong_type", "meta", str(e)) from None
    messages = row.get("prompt_messages")
    if messages is not None:
        messages = json.dumps(_messages(messages, "prompt"), ensure_ascii=False)
    return {
        "id": str(rid) if rid is not None else row_id(prompt, responses),
        "prompt": prompt,
        "responses": list(responses),
        "scores": floats,
        "sources": list(sources),
        "split": split,
        "meta": meta_text,
        "prompt_messages": messages,
    }


def parse_json_line(raw: bytes) -> Any:
    """Decode and parse one JSONL line; RowError(invalid_utf8 / blank_line / malformed_json) on failure."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", "", str(e)) from None
    if not text.strip():
        raise RowError("blank_line")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise RowError("malformed_json", "", str(e)[:200]) from None


def process_record(
    record: Any,
    fmt: str | None,
    max_chars: int,
    render: ChatRenderer = default_chat_renderer,
    fallback: str | None = None,
) -> dict[str, Any]:
    """A parsed JSON value (or a parquet / HF row as a dict) -> a validated canonical row. Raises RowError.

    ``fmt`` forces a layout. Without it the record's own keys decide, and ``fallback`` (the layout detected for
    its file) applies when they match no layout but share a key with it, so a TRL row missing ``rejected`` is
    reported as that missing field, and a record with none of the file's fields as an unknown layout."""
    if not isinstance(record, Mapping):
        raise RowError("not_an_object", "", f"got a JSON {type(record).__name__}")
    if fmt is None:
        fmt = detect_format(record)
        if fmt is None and fallback is not None and LAYOUT_KEYS[fallback] & set(record):
            fmt = fallback
    if fmt is None:
        raise RowError("unknown_format", "", f"columns {sorted(map(str, record))[:10]} match no layout")
    return validate(to_canonical(record, fmt, render), max_chars)
