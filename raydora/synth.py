"""The offline distribution-shift benchmark: list tasks a tiny model can learn, a programmatic gold reward, a
golden source and synthetic sources with learnable artefacts, labelled by biased labellers.

Prompts ask to ``sort``, ``reverse`` or ``count`` a short list of words. The gold reward (what the target, human
distribution prefers) mixes two objectives, ``gold = a * correctness + (1 - a) * conciseness``; training labels
use ``a = ALPHA0`` and evaluation sweeps ``a`` (WDPO's second shift). Sources:

- ``golden`` (Q0): correct, concise answers in a few surface forms;
- ``verbose``: correct answers padded with filler ("well , the answer is : ... i hope this helps");
- ``sloppy``: confident ("definitely :") answers with a small error (a swapped, dropped or wrong word; count +-1).

A synthetic source shows its artefact in ``ARTEFACT_RATE`` of its responses, so sources overlap as real ones do.
Golden responses are scored by gold; synthetic ones by a biased labeller,
``gold + LENGTH_BONUS * tokens + CONFIDENCE_BONUS * confident``, which prefers exactly the artefacts;
``label_noise`` shuffles a row's scores. Everything is deterministic per seed.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydora.config import RunConfig
from raydora.rundir import StageResult, fingerprint, is_done, promote, staging, write_success

WORDS = (
    "apple bird cake door echo fig goat hill iron jade kite lamp moon nest oak pear quill rose sand tree "
    "urn vine wolf yarn zinc arch bell coin dune elm frog gem harp ink jar"
).split()
TASKS = ("sort", "reverse", "count")
ALPHA0 = 0.8  # gold mix of correctness vs conciseness used for the training labels
LENGTH_BONUS = 0.04  # the biased labeller's reward per token (a length-loving reward model)
CONFIDENCE_BONUS = 0.4  # ... and for a confident tone
ARTEFACT_RATE = 0.85
CONFIDENT = ("definitely", "certainly")
FILLER_HEAD = ("well , the answer is :", "great question ! here it is :", "sure , let me help :")
FILLER_TAIL = (". i hope this helps !", ". let me know if you need more .", ". that is all .")
_INT = re.compile(r"-?\d+")


# ---- tasks and the gold reward ----------------------------------------------------------------------------------
def make_prompt(rng: random.Random) -> str:
    task = rng.choice(TASKS)
    return f"{task}: {' '.join(rng.sample(WORDS, rng.randint(3, 6)))}"


def parse_prompt(prompt: str) -> tuple[str, list[str]]:
    task, _, rest = prompt.partition(":")
    if task not in TASKS:
        raise ValueError(f"not a benchmark prompt: {prompt!r}")
    return task, rest.split()


def answer(prompt: str) -> str:
    """The correct, concise answer."""
    task, words = parse_prompt(prompt)
    if task == "count":
        return str(len(words))
    return " ".join(sorted(words) if task == "sort" else reversed(words))


def correctness(prompt: str, response: str) -> float:
    """In [0, 1]. Lists: the share of positions holding the right word, over the longer of answer and response
    (only vocabulary words count, so filler costs nothing here). Count: 1 if exact, 0.5 if off by one, else 0."""
    task, words = parse_prompt(prompt)
    if task == "count":
        found = _INT.findall(response)
        return 0.0 if not found else max(0.0, 1.0 - abs(int(found[0]) - len(words)) / 2)
    gold = answer(prompt).split()
    got = [t for t in response.split() if t in WORDS]
    hits = sum(a == b for a, b in zip(gold, got, strict=False))  # past the shorter list, every position misses
    return hits / max(len(gold), len(got))


def conciseness(prompt: str, response: str) -> float:
    """In (0, 1]: ``exp(-extra tokens / 4)`` beyond the correct answer's length."""
    extra = max(0, len(response.split()) - len(answer(prompt).split()))
    return math.exp(-extra / 4)


def gold_reward(prompt: str, response: str, alpha: float = ALPHA0) -> float:
    """What the target distribution prefers: ``alpha * correctness + (1 - alpha) * conciseness``."""
    return alpha * correctness(prompt, response) + (1 - alpha) * conciseness(prompt, response)


def biased_score(prompt: str, response: str) -> float:
    """The synthetic labeller: gold plus a bonus for length and for a confident tone (the artefacts)."""
    confident = any(response.startswith(c) for c in CONFIDENT)
    return gold_reward(prompt, response) + LENGTH_BONUS * len(response.split()) + CONFIDENCE_BONUS * confident


def artefact_rates(responses: list[str]) -> dict[str, float]:
    """The share of ``responses`` showing each synthetic source's artefact: ``filler`` (verbose's head or tail
    phrases) and ``confident`` (sloppy's opening word), plus ``empty``."""
    n = max(len(responses), 1)
    filler = sum(any(f in r for f in FILLER_HEAD + FILLER_TAIL) for r in responses)
    confident = sum(r.startswith(CONFIDENT) for r in responses)
    return {"filler": filler / n, "confident": confident / n, "empty": sum(not r.strip() for r in responses) / n}


# ---- sources ----------------------------------------------------------------------------------------------------
def golden(prompt: str, rng: random.Random) -> str:
    a = answer(prompt)
    return rng.choice([a, a.replace(" ", " , "), f"answer : {a}", f"{a} .", f"result : {a}"])


def verbose(prompt: str, rng: random.Random) -> str:
    if rng.random() > ARTEFACT_RATE:
        return golden(prompt, rng)
    return f"{rng.choice(FILLER_HEAD)} {answer(prompt)} {rng.choice(FILLER_TAIL)}"


def sloppy(prompt: str, rng: random.Random) -> str:
    if rng.random() > ARTEFACT_RATE:
        return golden(prompt, rng)
    task, words = parse_prompt(prompt)
    if task == "count":
        wrong = str(len(words) + rng.choice((-1, 1)))
    else:
        out = answer(prompt).split()
        i = rng.randrange(len(out))
        kind = rng.choice(("swap", "drop", "replace"))
        if kind == "swap" and len(out) > 1:
            j = (i + 1) % len(out)
            out[i], out[j] = out[j], out[i]
        elif kind == "drop":
            out.pop(i)
        else:
            out[i] = rng.choice([w for w in WORDS if w not in out])
        wrong = " ".join(out)
    return f"{rng.choice(CONFIDENT)} : {wrong}"


SOURCES = {"golden": golden, "verbose": verbose, "sloppy": sloppy}


def allocate(shares: dict[str, float], n: int, rng: random.Random) -> list[str]:
    """Exactly ``round(share * n)`` labels per source (largest remainder), shuffled."""
    exact = {s: p * n for s, p in shares.items()}
    counts = {s: int(v) for s, v in exact.items()}
    for s in sorted(exact, key=lambda s: exact[s] - counts[s], reverse=True)[: n - sum(counts.values())]:
        counts[s] += 1
    labels = [s for s, c in counts.items() for _ in range(c)]
    rng.shuffle(labels)
    return labels


# ---- rows -------------------------------------------------------------------------------------------------------
def generate_rows(
    start: int, count: int, *, k: int, shares: dict[str, float], label_noise: float, seed: int
) -> Iterator[dict[str, Any]]:
    """Rows ``start .. start+count-1`` of the benchmark: a pure function of (seed, start, count), so any worker
    regenerates a block identically (the output depends on how rows are cut into blocks: keep block_rows fixed).

    Each row holds the prompt, K responses with their sources, the biased training ``scores`` and the
    ``gold_scores`` (at ALPHA0, no noise), and the golden reference answer."""
    rng = random.Random(f"raydora-synth-{seed}-{start}")
    # Label noise draws from its own stream: the prompts, responses and sources are the same at every noise
    # level, so a label-noise sweep changes the labels and nothing else (and shares one SFT corpus).
    noise_rng = random.Random(f"raydora-synth-noise-{seed}-{start}")
    unknown = set(shares) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {sorted(SOURCES)}")
    labels = allocate(shares, count * k, rng)
    for i in range(count):
        prompt = make_prompt(rng)
        sources = labels[i * k : (i + 1) * k]
        for _ in range(16):  # redraw the rare row whose labels are all tied: it carries no preference
            responses: list[str] = []
            for src in sources:
                for _ in range(32):  # no duplicate texts within a row: duplicates carry no preference
                    text = SOURCES[src](prompt, rng)
                    if text not in responses:
                        break
                responses.append(text)
            gold = [round(gold_reward(prompt, r), 6) for r in responses]
            # Gold ranks the golden responses; the biased labeller scores the synthetic ones.
            scores = [
                g if s == "golden" else round(biased_score(prompt, r), 6)
                for g, s, r in zip(gold, sources, responses, strict=True)
            ]
            if len(set(scores)) > 1 and len(set(gold)) > 1:
                break
        if noise_rng.random() < label_noise:
            noise_rng.shuffle(scores)
        task, _ = parse_prompt(prompt)
        yield {
            "id": f"synth-{seed}-{start + i:09d}",
            "prompt": prompt,
            "responses": responses,
            "scores": scores,
            "sources": sources,
            "gold_scores": gold,
            "reference": answer(prompt),
            "task": task,
        }


def disagreement(rows: list[dict[str, Any]]) -> dict[str, float]:
    """How often the training labels order a response pair differently from gold, by pair type."""
    stats: dict[str, list[int]] = {"golden_pairs": [0, 0], "synthetic_pairs": [0, 0]}
    for row in rows:
        for i in range(len(row["responses"])):
            for j in range(i + 1, len(row["responses"])):
                g = row["gold_scores"][i] - row["gold_scores"][j]
                b = row["scores"][i] - row["scores"][j]
                if g == 0:
                    continue
                kind = "golden_pairs" if row["sources"][i] == row["sources"][j] == "golden" else "synthetic_pairs"
                stats[kind][0] += (g > 0) != (b > 0)
                stats[kind][1] += 1
    return {k: (d / n if n else 0.0) for k, (d, n) in stats.items()}


# ---- a validation set for hyperparameter selection (raydora tune) ------------------------------------------------
VALIDATION_START = 10**9  # row numbers of the validation stream: its blocks' seeds match no train/SFT block's


def validation_rows(
    count: int, *, k: int, shares: dict[str, float], seed: int, exclude: set[str]
) -> list[dict[str, Any]]:
    """``count`` rows of the benchmark labelled by gold (the target preference, no label noise), drawn from a stream
    of its own (rows from :data:`VALIDATION_START` on) and skipping every prompt in ``exclude`` (the train, SFT and
    eval prompts), so that selecting on them never sees a training row or an evaluation prompt."""
    out: list[dict[str, Any]] = []
    seen, start = set(exclude), VALIDATION_START
    while len(out) < count:
        for row in generate_rows(start, count, k=k, shares=shares, label_noise=0.0, seed=seed):
            if row["prompt"] not in seen and len(out) < count:
                seen.add(row["prompt"])
                out.append({**view(row, "oracle"), "split": "validation"})
        start += count
    return out


def split_prompts(synth_dir: str | Path, splits: tuple[str, ...] = ("train", "sft", "eval")) -> set[str]:
    """Every prompt of the benchmark's ``splits`` (JSON lines under ``synth_dir``)."""
    import json

    prompts: set[str] = set()
    for split in splits:
        for f in sorted((Path(synth_dir) / split).glob("*.json")):
            with f.open(encoding="utf-8") as fh:
                prompts.update(json.loads(line)["prompt"] for line in fh if line.strip())
    return prompts


# ---- the stage --------------------------------------------------------------------------------------------------
def _eval_rows(start: int, count: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"raydora-synth-eval-{seed}-{start}")  # a stream disjoint from the training rows
    for i in range(count):
        prompt = make_prompt(rng)
        yield {
            "id": f"eval-{seed}-{start + i:09d}",
            "prompt": prompt,
            "reference": answer(prompt),
            "task": parse_prompt(prompt)[0],
        }


def view(row: dict[str, Any], split: str) -> dict[str, Any]:
    """A generated row as one output split: ``train`` (biased labels), ``oracle`` (gold labels) or ``sft``."""
    if split == "sft":
        return {"prompt": row["prompt"], "response": row["responses"][0], "source": row["sources"][0]}
    scores = row["scores"] if split == "train" else row["gold_scores"]
    return {
        "id": row["id"],
        "prompt": row["prompt"],
        "responses": row["responses"],
        "scores": scores,
        "sources": row["sources"],
        "split": split,
        "meta": {"task": row["task"]},
    }


def _generate_split(batch: dict[str, Any], split: str, params: dict[str, Any]) -> Iterator[Any]:
    """Ray Data UDF: one block descriptor in, its rows of ``split`` out (as Arrow tables of <= 4096 rows)."""
    import pyarrow as pa

    for start, count in zip(batch["start"], batch["count"], strict=True):
        if split == "eval":
            rows = list(_eval_rows(int(start), int(count), params["seed"]))
        else:
            rows = [view(r, split) for r in generate_rows(int(start), int(count), **params)]
        for i in range(0, len(rows), 4096):
            yield pa.Table.from_pylist(rows[i : i + 4096])


def write_benchmark(
    output: str | Path,
    *,
    rows: int,
    k: int = 4,
    alpha: float = 0.25,
    source_shares: dict[str, float] | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    eval_rows: int = 500,
    sft_rows: int | None = None,
    block_rows: int = 10_000,
    force: bool = False,
) -> StageResult:
    """Generate the benchmark into ``output/{train,oracle,sft,eval}/*.json`` (JSON lines) with Ray Data.

    ``train`` holds the biased training labels, ``oracle`` the same rows labelled by gold (the upper bound),
    ``sft`` one response per prompt drawn from the mixture (the warm-start corpus, ``sft_rows`` prompts, default
    ``rows``, the first ``rows`` of them the same prompts as ``train``), ``eval`` held-out prompts
    with golden references. Blocks of ``block_rows`` rows are generated in parallel and streamed to disk, so
    memory stays bounded whatever ``rows`` is. Skips when ``output/_SUCCESS`` matches the parameters."""
    import ray.data

    from raydora.data import ordered

    shares = {"golden": alpha, **(source_shares if source_shares is not None else {"verbose": 0.375, "sloppy": 0.375})}
    params: dict[str, Any] = {"k": k, "shares": shares, "label_noise": label_noise, "seed": seed}
    out = Path(output)
    sft_rows = rows if sft_rows is None else sft_rows
    fp = fingerprint("synth", params, rows, eval_rows, block_rows, *([sft_rows] if sft_rows != rows else []))
    counts = {"train": rows, "oracle": rows, "sft": sft_rows, "eval": eval_rows}
    outputs = {split: str(out / split) for split in counts}
    if not force and is_done(out, fp):
        return StageResult("synth", outputs, counts, skipped=True)
    with staging(out.parent, out.name) as tmp:
        for split, n in counts.items():
            blocks = [{"start": s, "count": min(block_rows, n - s)} for s in range(0, n, block_rows)]
            ds: Any = ray.data.from_items(blocks, override_num_blocks=len(blocks))
            ds = ds.map_batches(_generate_split, batch_size=1, fn_kwargs={"split": split, "params": params})
            ordered(ds).write_json(str(tmp / split))  # files in block order, whichever block finishes first
        sample = list(generate_rows(0, min(rows, 2000), **params))
        info = {
            "stage": "synth",
            "fingerprint": fp,
            "rows": counts,
            "params": params,
            "alpha0": ALPHA0,
            "label_disagreement": disagreement(sample),
        }
        write_success(tmp, info)
        promote(tmp, out)
    return StageResult("synth", outputs, counts, info=info)


def corpus(synth_dir: str | Path) -> Iterator[str]:
    """Every prompt and response of the benchmark's ``train`` and ``sft`` splits, streamed from disk."""
    import json

    for split in ("train", "sft"):
        for f in sorted((Path(synth_dir) / split).glob("*.json")):
            with f.open(encoding="utf-8") as lines:
                for line in lines:
                    row = json.loads(line)
                    yield row["prompt"]
                    yield from row.get("responses", [row.get("response", "")])


def write_tokenizer(synth_dir: str | Path, out_dir: str | Path, vocab_size: int = 512) -> StageResult:
    """Train the byte-level BPE of the tiny presets on the benchmark corpus and save it as a HF folder."""
    from raydora.reference import write_tokenizer as train_into

    marker = Path(synth_dir) / "_SUCCESS"
    source = marker.read_text() if marker.exists() else str(synth_dir)
    return train_into(lambda: corpus(synth_dir), out_dir, source, vocab_size)


def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage: the benchmark of ``cfg.synth`` into ``<run_dir>/synth``, plus (for preset policies without
    a configured tokenizer) a BPE trained on its corpus in ``<run_dir>/tokenizer``. ``force`` rewrites the
    benchmark even when it is up to date."""
    s, run_dir = cfg.synth, Path(run_dir)
    result = write_benchmark(
        run_dir / "synth",
        rows=s.rows,
        k=s.k,
        alpha=s.alpha,
        source_shares=s.source_shares,
        label_noise=s.label_noise,
        seed=cfg.seed,
        eval_rows=s.eval_rows,
        sft_rows=s.sft_rows,
        force=force,
    )
    if cfg.model.tokenizer is None:
        tok = write_tokenizer(run_dir / "synth", run_dir / "tokenizer", cfg.model.vocab_size)
        result.outputs.update(tok.outputs)
        result.counts.update(tok.counts)
    return result
