"""Model and tokenizer names resolved before any work starts: a local folder, a preset, or a name found in the local
Hugging Face cache. Anything else fails at once (no stage has run yet), with the fix in the message. raydora never
downloads: on a machine with internet, ``huggingface-cli download ORG/NAME`` fills the cache this reads.

Light on purpose (pathlib, and huggingface_hub only for a name that is not a folder), so a bad name fails in well
under a second instead of after the first stages' work."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from raydora.config import ConfigError

# The preset names of raydora.models.PRESETS (kept here so this check does not import torch; a test compares them).
CAUSAL_PRESETS = ("tiny-gpt2", "small-gpt2", "base-gpt2", "tiny-llama", "small-llama")
ENCODER_PRESETS = ("tiny-bert", "small-bert")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache this process reads (``HF_HUB_CACHE``, ``HF_HOME``/hub, or the default)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def from_hf_cache(name: str, marker: str) -> Path | None:
    """The cached snapshot folder of hub repo ``name`` holding ``marker`` (e.g. config.json), or None."""
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, marker)
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def resolve_folder(key: str, value: str, marker: str, presets: tuple[str, ...] = ()) -> str:
    """``value`` as given when it is a preset or an existing folder; the cached snapshot when it is a hub name in the
    local cache; else a ConfigError naming ``key`` and how to fix it."""
    if value in presets:
        return value
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        return value
    if path.exists():
        raise ConfigError(key, f"{value!r} is a file; give the folder holding {marker}")
    cached = from_hf_cache(value, marker)
    if cached is not None:
        print(f"[config] {key}={value} found in the local Hugging Face cache: {cached}", flush=True)
        return str(cached)
    hint = f" or a preset ({', '.join(presets)})" if presets else ""
    raise ConfigError(
        key,
        f"{value!r} is not a local folder{hint}, and not in the local Hugging Face cache ({hf_cache_dir()}). "
        f"raydora never downloads: run `huggingface-cli download {value}` (or save_pretrained the model) on a "
        "machine with internet and pass that folder, or copy the cache here (HF_HOME / HF_HUB_CACHE)",
    )


def resolve_model_paths(cfg: Any) -> Any:
    """``cfg`` with ``model.policy``, ``model.tokenizer`` and ``classifier.backbone`` checked (and hub names found
    in the local cache replaced by their snapshot folders). Raises ConfigError naming the key."""
    m, c = cfg.model, cfg.classifier
    policy = resolve_folder("model.policy", m.policy, "config.json", CAUSAL_PRESETS)
    tokenizer = None if m.tokenizer is None else resolve_folder("model.tokenizer", m.tokenizer, "tokenizer_config.json")
    backbone = c.backbone
    if backbone != "auto":
        backbone = resolve_folder("classifier.backbone", backbone, "config.json", ENCODER_PRESETS)
    if (policy, tokenizer, backbone) == (m.policy, m.tokenizer, c.backbone):
        return cfg
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(m, policy=policy, tokenizer=tokenizer),
        classifier=dataclasses.replace(c, backbone=backbone),
    )
