"""Layout conversion and row validation (pure, no Ray), including a hypothesis fuzz of malformed rows."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raydora import schema
from raydora.schema import RowError, process_record

MAX = 1000


def ok(record, fmt=None, **kw):
    return process_record(record, fmt, MAX, **kw)


def reason(record, fmt=None) -> tuple[str, str]:
    with pytest.raises(RowError) as err:
        process_record(record, fmt, MAX)
    return err.value.reason, err.value.field


def test_canonical_passes_through_and_fills_defaults() -> None:
    row = ok({"prompt": "p", "responses": ["a", "b", "c"], "scores": [1, 0.5, 0], "meta": {"k": 1}, "split": "train"})
    assert row["responses"] == ["a", "b", "c"] and row["scores"] == [1.0, 0.5, 0.0]
    assert row["sources"] == ["unknown"] * 3 and row["split"] == "train" and json.loads(row["meta"]) == {"k": 1}
    assert row["id"] == schema.row_id("p", ["a", "b", "c"]) and len(row["id"]) == 20
    assert ok({"id": 7, "prompt": "p", "responses": ["a", "b"], "scores": [0, 1]})["id"] == "7"


def test_trl_string_pairs() -> None:
    row = ok({"prompt": "Q?", "chosen": " yes", "rejected": " no"})
    assert (row["prompt"], row["responses"], row["scores"]) == ("Q?", [" yes", " no"], [1.0, 0.0])


def test_trl_conversational_uses_the_chat_template() -> None:
    rec = {"prompt": [{"role": "user", "content": "hi"}],
           "chosen": [{"role": "assistant", "content": "hello"}],
           "rejected": [{"role": "assistant", "content": "go away"}]}  # fmt: skip
    assert schema.detect_format(rec) == "trl_conversational"
    row = ok(rec)
    assert row["prompt"] == "<|user|>\nhi\n<|assistant|>\n" and row["responses"] == ["hello", "go away"]
    custom = ok(rec, render=lambda msgs: "|".join(m["content"] for m in msgs) + ">")
    assert custom["prompt"] == "hi>"


def test_trl_implicit_prompt_strings_and_messages() -> None:
    """The shared prefix is the prompt, cut back to whitespace: 'Q: name a fruit. A: ' + 'apple' / 'axe'."""
    row = ok({"chosen": "Q: name a fruit. A: apple", "rejected": "Q: name a fruit. A: axe"})
    assert row["prompt"] == "Q: name a fruit. A: " and row["responses"] == ["apple", "axe"]
    conv = ok({"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
               "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bye"}]})  # fmt: skip
    assert conv["prompt"] == "<|user|>\nhi\n<|assistant|>\n" and conv["responses"] == ["hello", "bye"]


def test_rrhf_layout() -> None:
    row = ok({"query": "q", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5], "probs": [0.2, 0.3, 0.5]})
    assert row["prompt"] == "q" and row["scores"] == [0.1, 0.9, 0.5]


CANON = {"prompt": "p", "responses": ["a", "b"], "scores": [1, 0]}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ([1, 2], ("not_an_object", "")),
        ({"foo": 1}, ("unknown_format", "")),
        ({**CANON, "prompt": None}, ("missing_field", "prompt")),
        ({**CANON, "prompt": 3}, ("wrong_type", "prompt")),
        ({**CANON, "responses": "ab"}, ("wrong_type", "responses")),
        ({**CANON, "responses": ["a", 2]}, ("wrong_type", "responses[1]")),
        ({**CANON, "scores": [1, "x"]}, ("wrong_type", "scores[1]")),
        ({**CANON, "scores": [True, 0]}, ("wrong_type", "scores[0]")),
        ({**CANON, "sources": ["golden"]}, ("length_mismatch", "sources")),
        ({**CANON, "prompt": "  "}, ("empty_text", "prompt")),
        ({**CANON, "responses": ["a", ""]}, ("empty_text", "responses[1]")),
        ({**CANON, "responses": ["a"], "scores": [1]}, ("too_few_responses", "responses")),
        ({**CANON, "scores": [1, 0, 2]}, ("length_mismatch", "scores")),
        ({**CANON, "scores": [math.nan, 0]}, ("nonfinite_score", "scores[0]")),
        ({**CANON, "scores": [1, math.inf]}, ("nonfinite_score", "scores[1]")),
        ({**CANON, "scores": [0.5, 0.5]}, ("tied_scores", "scores")),
        ({**CANON, "prompt": "\ud800x"}, ("invalid_utf8", "prompt")),
        ({**CANON, "prompt": "x" * 1001}, ("over_length", "responses")),
        ({"prompt": "q", "chosen": "a"}, ("unknown_format", "")),  # with its file's layout: missing rejected
        ({"prompt": "q", "chosen": ["not", "messages"], "rejected": "b"}, ("wrong_type", "chosen")),
        ({"chosen": "abc", "rejected": "xyz"}, ("missing_field", "prompt")),
    ],
)
def test_every_reason_names_the_field(record, expected) -> None:
    assert reason(record) == expected


def test_parse_json_line_reasons() -> None:
    for raw, why in [(b"\xff{}", "invalid_utf8"), (b"   ", "blank_line"), (b"{'a': 1}", "malformed_json")]:
        with pytest.raises(RowError) as err:
            schema.parse_json_line(raw)
        assert err.value.reason == why
    assert schema.parse_json_line(b'{"a": NaN}')["a"] != schema.parse_json_line(b'{"a": NaN}')["a"]


def test_forced_format_and_file_fallback() -> None:
    assert reason({"prompt": "q", "responses": ["a", "b"], "scores": [1, 0]}, fmt="trl") == ("missing_field", "chosen")
    # auto: the record's own keys win; the file's layout only explains records that match nothing
    assert process_record({"query": "q", "responses": ["a", "b"], "scores": [1, 0]}, None, MAX, fallback="trl")
    with pytest.raises(RowError, match="rejected"):
        process_record({"prompt": "q", "chosen": "a"}, None, MAX, fallback="trl")


# ---- fuzz ------------------------------------------------------------------------------------------------------
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                      max_leaves=12)  # fmt: skip
keys = st.sampled_from(["id", "prompt", "responses", "scores", "sources", "chosen", "rejected", "query", "meta",
                        "split", "probs", "x"])  # fmt: skip
records = st.one_of(
    st.dictionaries(keys, values, max_size=7),
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "responses": st.lists(st.text(max_size=10), max_size=5),
                           "scores": st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=5)}),
    values,
)  # fmt: skip


@settings(max_examples=1200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_fuzz_records_never_crash(record) -> None:
    """1,200 random records: each becomes a valid canonical row or a RowError with a named reason."""
    try:
        row = process_record(record, None, MAX)
    except RowError as e:
        assert e.reason in schema.REASONS
    else:
        assert set(row) == set(schema.CANONICAL_COLUMNS)
        assert len(row["responses"]) == len(row["scores"]) == len(row["sources"]) >= 2
        assert all(math.isfinite(s) for s in row["scores"]) and len(set(row["scores"])) > 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=60) | st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzz_raw_lines_never_crash(raw: bytes) -> None:
    try:
        process_record(schema.parse_json_line(raw), None, MAX)
    except RowError as e:
        assert e.reason in schema.REASONS
