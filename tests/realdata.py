"""Test data that looks like what users bring (no downloads): TRL-layout preference files as public datasets ship
them, with the mess of real data.

- ``dialogues.jsonl.gz``: multi-turn dialogues in TRL's implicit-prompt layout (``chosen`` and ``rejected`` are
  whole conversations sharing their first turns), gzip-compressed, no source labels, some conversations far longer
  than a small ``model.max_length``;
- ``pairs.jsonl``: pairwise rows (``prompt``/``chosen``/``rejected`` strings) from named generators
  (``chosen_source`` / ``rejected_source``: ``human``, ``gen-alpha``, ``gen-beta``), responses from a few words
  to several thousand characters.

The chosen response is consistently the helpful one (it answers and names the topic), so a policy can learn the
preference in a few steps; ``gen-alpha`` pads its answers with filler and ``gen-beta`` answers tersely: artefacts a
target-vs-source classifier can pick up.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

TOPICS = ["rivers", "volcanoes", "bread", "chess", "bees", "tides", "glass", "comets", "maps", "salt", "owls", "ink"]
FILLER = "As an assistant I am always happy to help, and I hope this helps you a great deal. "


def _helpful(topic: str, rng: random.Random, long: bool = False) -> str:
    facts = [f"{topic} have a long history", f"people study {topic} closely", f"{topic} change with time",
             f"many books cover {topic}"]  # fmt: skip
    text = f"Sure. About {topic}: " + "; ".join(rng.sample(facts, 2)) + "."
    return text + (" " + " ".join(f"Detail {i}: {topic} matter for reason {i}." for i in range(60)) if long else "")


def _unhelpful(topic: str, rng: random.Random) -> str:
    return rng.choice(["No idea.", "Ask someone else.", f"Whatever, {topic} are boring.", "I won't answer that."])


def dialogue_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        turns = rng.choice([1, 2, 3, 6])  # some dialogues run far past a small model.max_length
        history = []
        for t in range(turns - 1):
            history += [{"role": "user", "content": f"Tell me something about {rng.choice(TOPICS)} ({t})."},
                        {"role": "assistant", "content": _helpful(rng.choice(TOPICS), rng)}]  # fmt: skip
        history.append({"role": "user", "content": f"Question {i}: what about {topic}?"})
        chosen = [*history, {"role": "assistant", "content": _helpful(topic, rng, long=rng.random() < 0.2)}]
        rejected = [*history, {"role": "assistant", "content": _unhelpful(topic, rng)}]
        rows.append({"chosen": chosen, "rejected": rejected})
    return rows


def pair_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        generator = rng.choice(["gen-alpha", "gen-beta"])
        other = (
            FILLER * rng.randint(1, 40) + _unhelpful(topic, rng) if generator == "gen-alpha" else _unhelpful(topic, rng)
        )
        human = _helpful(topic, rng, long=rng.random() < 0.15)
        rows.append({"prompt": f"Explain {topic} briefly (request {i}).", "chosen": human, "rejected": other,
                     "chosen_source": "human", "rejected_source": generator})  # fmt: skip
    return rows


def write_user_data(folder: Path, dialogues: int = 60, pairs: int = 60) -> Path:
    """The two files in ``folder`` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "dialogues.jsonl.gz", "wt", encoding="utf-8") as f:
        for row in dialogue_rows(dialogues):
            f.write(json.dumps(row) + "\n")
    with (folder / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for row in pair_rows(pairs):
            f.write(json.dumps(row) + "\n")
    return folder
