"""Rewards: a batched :data:`Reward` ``(prompts, responses) -> rewards`` that the evaluate stage scores samples with
and the online loop labels them with.

``gold`` is the benchmark's programmatic gold reward (:func:`raydora.synth.gold_reward`, at the training labels'
``ALPHA0`` unless given), ``biased`` its labeller (long and confident answers win). Otherwise a reward is a local
folder: a raydora classifier (it holds ``calibration.json``; the reward is its calibrated ``p_golden``) or a reward
model (``*ForSequenceClassification`` with one logit; the reward is that logit), run on a Ray Data actor pool
(:class:`RewardModel`, :func:`model_reward`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

Reward = Callable[[Sequence[str], Sequence[str]], np.ndarray]  # (prompts, responses) -> rewards


def gold(alpha: float | None = None) -> Reward:
    """The benchmark's gold reward at ``alpha`` (default: the training labels' ALPHA0)."""
    from raydora import synth

    a = synth.ALPHA0 if alpha is None else alpha
    return pointwise(lambda p, r: synth.gold_reward(p, r, a))


class RewardModel:
    """A reward from a local model folder: a raydora classifier (``calibration.json``: the calibrated p_golden) or a
    sequence-classification reward model with one logit. Also a Ray Data callable class (``prompt``/``response``
    columns in, ``reward`` added)."""

    def __init__(self, path: str, max_length: int = 256, batch_size: int = 64, device: str = "cpu") -> None:
        import torch

        from raydora.classifier import read_calibration
        from raydora.models import load_encoder, load_tokenizer

        folder = Path(path)
        calib = read_calibration(folder) or {}
        self.temperature, self.bias = calib.get("temperature"), calib.get("bias", 0.0)
        config = json.loads((folder / "config.json").read_text())
        labels = 2 if self.temperature is not None else len(config.get("id2label", {"0": 0}))
        model: Any = load_encoder(folder, num_labels=labels)
        self.model = model.to(device).eval()
        self.tokenizer = load_tokenizer(folder)
        self.max_length, self.batch_size, self.torch = max_length, batch_size, torch

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        from raydora.calibration import calibrated
        from raydora.classifier import encode, margins

        out = []
        for i in range(0, len(prompts), self.batch_size):
            p, r = list(prompts[i : i + self.batch_size]), list(responses[i : i + self.batch_size])
            if self.temperature is not None:
                z = margins(self.model, self.tokenizer, p, r, self.max_length)
                out.append(calibrated(z, self.temperature, self.bias))
                continue
            with self.torch.no_grad():
                enc = encode(self.tokenizer, p, r, self.max_length).to(next(self.model.parameters()).device)
                logits = self.model(**enc).logits.float()
            out.append(logits[:, -1].cpu().numpy().astype(np.float64))
        return np.concatenate(out) if out else np.zeros(0)

    def __call__(self, batch: pa.Table) -> pa.Table:
        r = self.rewards(batch.column("prompt").to_pylist(), batch.column("response").to_pylist())
        return batch.append_column("reward", pa.array(r, pa.float64()))


def named_reward(name: str, max_length: int) -> Reward:
    """``gold`` (the benchmark's gold reward), ``biased`` (its labeller: long and confident answers win) or a
    reward-model / raydora-classifier folder (:func:`model_reward`), as one batched :data:`Reward`."""
    from raydora import synth

    if name == "gold":
        return gold()
    if name == "biased":
        return pointwise(synth.biased_score)
    return model_reward(name, max_length)


def model_reward(path: str | Path, max_length: int, device: str = "auto", actors: int = 1) -> Reward:
    """A :data:`Reward` that streams (prompt, response) pairs through :class:`RewardModel` actors in Ray Data."""
    import ray
    import ray.data

    from raydora.cluster import resolve_device
    from raydora.data import map_on_actor_pool

    dev = resolve_device(device)

    def score(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0)
        table = pa.table({"i": np.arange(len(prompts)), "prompt": list(prompts), "response": list(responses)})
        ds = map_on_actor_pool(
            ray.data.from_arrow(table),
            RewardModel,
            {"path": str(Path(path).absolute()), "max_length": max_length, "device": dev},
            keys=("reward-model actors", "CPUs per reward-model actor"),
            batch_size=64,
            actors=actors,
            actor_cpus=0.75,
            gpus=1 if dev == "cuda" else 0,
        )
        out = ds.to_arrow_refs()
        scored = pa.concat_tables(ray.get(out)).sort_by("i")
        rewards: np.ndarray = scored.column("reward").to_numpy()
        return rewards

    return score


def pointwise(fn: Callable[[str, str], float]) -> Reward:
    """A batched :data:`Reward` from a reward of one (prompt, response) pair."""
    return lambda prompts, responses: np.array([fn(p, r) for p, r in zip(prompts, responses, strict=True)])
