"""Reference log-probs: one Ray Data pass of the frozen reference model over the preference rows, on an actor
pool, so the reference model never sits on the trainers.

Input is ``scored/`` when the classify stage ran (it carries ``p_golden``), else ``data/``. Output
``reference/`` holds those rows plus

- ``prompt_ids: list<int32>`` and ``response_ids: list<list<int32>>``: the exact tokens training uses
  (``encoding.encode``: chat-template prompt, response + EOS, truncated to ``model.max_length``);
- ``reference_logps: list<float64>``: ``sum_t log p_ref(y_t | x, y_<t)`` over each response's tokens.

The log-probs come from ``encoding.forward_logps``, the same code the trainer runs, so at step 0 the policy's
log-probs equal them. The ``_SUCCESS`` fingerprint covers the model's weights, the input rows, the tokenizer and
``max_length``: a rerun with the same cache key skips the pass.

The reference (and initial policy) model is ``sft/final`` after the SFT warm start, else ``model.policy``: a local
HF folder, or a preset built once into ``init/`` so the reference pass and every trainer load the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydora.cluster import resolve_device
from raydora.config import RunConfig
from raydora.data import IO_CPUS, map_rows, read_canonical
from raydora.rundir import (
    StageResult,
    file_fingerprints,
    fingerprint,
    is_done,
    promote,
    read_success,
    staging,
    write_success,
)


def write_tokenizer(
    texts: Callable[[], Iterable[str]], out_dir: str | Path, source: str, vocab_size: int = 512
) -> StageResult:
    """Train the byte-level BPE of the preset policies on ``texts()`` into ``out_dir`` (a HF folder), unless a
    tokenizer trained from the same ``source`` (a fingerprint of the corpus) and vocabulary is already there."""
    from raydora.models import train_tokenizer

    out = Path(out_dir)
    fp = fingerprint("tokenizer", source, vocab_size)
    if is_done(out, fp):
        return StageResult("tokenizer", {"tokenizer": str(out)}, {}, skipped=True)
    with staging(out.parent, out.name) as tmp:
        tok = train_tokenizer(texts(), tmp / "tok", vocab_size=vocab_size)
        write_success(tmp / "tok", {"stage": "tokenizer", "fingerprint": fp, "vocab": len(tok)})
        promote(tmp / "tok", out)
    return StageResult("tokenizer", {"tokenizer": str(out)}, {"vocab": len(tok)})


TOKENIZER_CORPUS_CHARS = 50_000_000  # a 512-token BPE learns its merges long before this


def data_corpus(
    data_dir: str | Path, max_chars: int = TOKENIZER_CORPUS_CHARS, kinds: tuple[str, ...] | None = None
) -> Iterator[str]:
    """Prompts and responses of the rows in ``data_dir`` (canonical parquet; staged rows of validate when ``kinds``
    names the kinds to keep), streamed, up to ``max_chars`` characters."""
    seen = 0
    columns = ["prompt", "responses", *(["kind"] if kinds else [])]
    for f in sorted(Path(data_dir).glob("*.parquet")):
        for batch in pq.ParquetFile(f).iter_batches(columns=columns, batch_size=1024):
            for row in batch.to_pylist():
                if kinds and row["kind"] not in kinds:
                    continue
                for text in (row["prompt"], *row["responses"]):
                    yield text
                    seen += len(text)
                if seen >= max_chars:
                    return


def needs_run_tokenizer(cfg: Any) -> bool:
    """Whether the run trains its own tokenizer: a preset policy and no ``model.tokenizer``."""
    from raydora.models import PRESETS

    return cfg.model.tokenizer is None and cfg.model.policy in PRESETS


def tokenizer_dir(cfg: Any, run_dir: Path) -> Path:
    """The run's tokenizer: ``model.tokenizer``, else the BPE trained into ``tokenizer/`` (by the synth stage on the
    benchmark, or by validate on your data), else a real policy folder's own."""
    if cfg.model.tokenizer:
        return Path(cfg.model.tokenizer)
    tok = Path(run_dir) / "tokenizer"
    if not tok.is_dir() and Path(cfg.model.policy).is_dir():
        return Path(cfg.model.policy)  # a real model folder carries its tokenizer
    return tok


def trained_policy(run_dir: str | Path) -> Path | None:
    """``train/final`` when the train stage finished, else None."""
    final = Path(run_dir).absolute() / "train" / "final"
    return final if read_success(final.parent) is not None and final.is_dir() else None


def initial_policy(cfg: Any, run_dir: str | Path) -> Path:
    """The folder preference training starts from and the reference model: ``sft/final`` when the SFT stage
    finished, else ``model.policy`` (a preset is built once, with ``seed``, into ``init/``)."""
    run_dir = Path(run_dir).absolute()
    sft = run_dir / "sft" / "final"
    if cfg.sft.enabled and read_success(run_dir / "sft") is not None and sft.is_dir():
        return sft
    return base_policy(cfg, run_dir)


def base_policy(cfg: Any, run_dir: str | Path) -> Path:
    """``model.policy`` as a folder: a path as given, a preset built once (with ``seed``) into ``init/``."""
    from raydora.models import PRESETS, build_model, load_tokenizer, save_pretrained

    run_dir = Path(run_dir).absolute()
    if cfg.model.policy not in PRESETS:
        return Path(cfg.model.policy).absolute()
    init = run_dir / "init"
    fp = fingerprint("init", cfg.model.policy, cfg.seed, file_fingerprints(tokenizer_dir(cfg, run_dir)))
    if not is_done(init, fp):
        tok = load_tokenizer(tokenizer_dir(cfg, run_dir))
        model = build_model(cfg.model.policy, tok, seed=cfg.seed, attn_implementation=attn_implementation(cfg))
        with staging(run_dir, "init") as tmp:
            save_pretrained(model, tok, tmp / "model")
            write_success(tmp / "model", {"stage": "init", "fingerprint": fp, "preset": cfg.model.policy})
            promote(tmp / "model", init)
    return init


def attn_implementation(cfg: Any) -> str:
    """``model.attn_implementation``; ``auto`` is sdpa (measured faster than eager on CPU too, in TRL's runs and
    ours), except eager for WDPO's exact double backward, which the fused kernels lack."""
    a = cfg.model.attn_implementation
    if a != "auto":
        return str(a)
    t = cfg.train
    return "eager" if t.objective == "wdpo" and t.wdpo_grad == "double_backward" else "sdpa"


class ReferenceModel:
    """Ray Data callable class: tokenises rows exactly as training does and adds the frozen model's log-probs.

    ``model_dir=None`` only tokenises (the SFT corpus needs ids, not reference log-probs). ``more_models``: further
    frozen models scored on the same tokens in the same actor, as ``reference_logps_1``, ``reference_logps_2``, ...
    (the held-out evaluation scores the trained and the initial policy in one pass: one actor start-up)."""

    def __init__(
        self,
        model_dir: str | None,
        tokenizer_dir: str,
        max_length: int,
        batch_size: int = 16,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int = 0,
        attn: str = "sdpa",
        frozen_in_compute_dtype: bool = False,
        pad_to_multiple_of: int = 0,
        max_prompt_length: int | None = None,
        logprob_chunk: int | str = 0,
        more_models: tuple[str, ...] = (),
    ) -> None:
        import torch

        from raydora.hardware import resolve_precision
        from raydora.models import load_causal_lm, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.max_length, self.batch_size, self.device = max_length, batch_size, device
        self.pad_to_multiple_of, self.max_prompt_length = pad_to_multiple_of, max_prompt_length
        self.logprob_chunk = logprob_chunk
        self.dtype = resolve_precision(precision, device)
        self.models: list[Any] = []
        # The weights as the trainers hold them at step 0, with the same autocast: fp32 master weights, or, for
        # LoRA training (``frozen_in_compute_dtype``), a frozen base stored in the compute dtype (bf16 on GPUs).
        weights = self.dtype if frozen_in_compute_dtype else torch.float32
        for folder in [model_dir, *more_models] if model_dir is not None else []:
            model: Any = load_causal_lm(folder, dtype=weights, attn_implementation=attn)
            self.models.append(model.to(device).eval())
        self.model: Any = self.models[0] if self.models else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raydora.encoding import encode_batch

        prompts = batch.column("prompt").to_pylist()
        responses = batch.column("responses").to_pylist()
        names = batch.schema.names
        messages = batch.column("prompt_messages").to_pylist() if "prompt_messages" in names else None
        truncated: list[bool] = []
        prompt_ids, response_ids = encode_batch(
            self.tokenizer,
            prompts,
            responses,
            self.max_length,
            messages=messages,
            max_prompt_length=self.max_prompt_length,
            truncated=truncated,
        )
        if "truncated" in names:  # rows re-encoded by a later stage (the loop's rounds) get the new flags
            batch = batch.drop_columns(["truncated"])
        batch = batch.append_column("truncated", pa.array(truncated, pa.bool_()))
        batch = batch.append_column("prompt_ids", pa.array(prompt_ids, pa.list_(pa.int32())))
        batch = batch.append_column("response_ids", pa.array(response_ids, pa.list_(pa.list_(pa.int32()))))
        for i, model in enumerate(self.models):
            logps = self.logps(prompt_ids, response_ids, model)
            name = f"reference_logps_{i}" if i else "reference_logps"
            batch = batch.append_column(name, pa.array(logps, pa.list_(pa.float64())))
        return batch

    def logps(
        self, prompt_ids: list[list[int]], response_ids: list[list[list[int]]], model: Any = None
    ) -> list[list[float]]:
        """Summed response log-probs of ``model`` (default: the first), one per response, in batches of
        ``batch_size`` sequences."""
        import torch

        from raydora.encoding import forward_logps, pad_sequences
        from raydora.hardware import autocast

        flat = [(p, r) for p, rs in zip(prompt_ids, response_ids, strict=True) for r in rs]
        out = np.zeros(len(flat))
        pad = self.tokenizer.pad_token_id
        with torch.no_grad(), autocast(self.device, self.dtype):
            for i in range(0, len(flat), self.batch_size):
                chunk = flat[i : i + self.batch_size]
                enc = pad_sequences(
                    [c[0] for c in chunk], [[c[1]] for c in chunk], None, pad, multiple_of=self.pad_to_multiple_of
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                lp, _, _ = forward_logps(self.model if model is None else model, enc, 1, chunk=self.logprob_chunk)
                out[i : i + len(chunk)] = lp[:, 0].double().cpu().numpy()
        res, k = [], 0
        for rs in response_ids:
            res.append(out[k : k + len(rs)].tolist())
            k += len(rs)
        return res


def encode_rows(
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    model_dir: str | Path | None,
    tokenizer: str | Path,
    max_length: int,
    cfg: Any,
    stage: str,
    fp: str,
    precision: str = "fp32",
    attn: str = "sdpa",
    frozen_in_compute_dtype: bool = False,
    pad_to_multiple_of: int = 0,
    max_prompt_length: int | None = None,
    logprob_chunk: int | str = 0,
    more_models: tuple[str | Path, ...] = (),
) -> int:
    """Stream ``input_dir``'s parquet rows through :class:`ReferenceModel` actors (``cfg.actors``; 0: this
    process) into ``out_dir`` (atomically, with a ``_SUCCESS`` marker holding ``fp``, the row count and how many
    rows were truncated). Returns the row count. ``more_models`` add ``reference_logps_1``, ... (see
    :class:`ReferenceModel`)."""
    out = Path(out_dir)
    device = resolve_device(cfg.device, here=cfg.actors == 0)
    with staging(out.parent, out.name) as tmp:
        rows_in = read_canonical(input_dir, num_cpus=IO_CPUS, block_rows=cfg.batch_size, slice_rows=8 * cfg.batch_size)
        kwargs = {
            "model_dir": None if model_dir is None else str(Path(model_dir).absolute()),
            "tokenizer_dir": str(Path(tokenizer).absolute()),
            "max_length": max_length,
            "batch_size": cfg.batch_size,
            "device": device,
            "precision": precision,
            "attn": attn,
            "frozen_in_compute_dtype": frozen_in_compute_dtype,
            "pad_to_multiple_of": pad_to_multiple_of,
            "max_prompt_length": max_prompt_length,
            "logprob_chunk": logprob_chunk,
            "more_models": tuple(str(Path(m).absolute()) for m in more_models),
        }
        rows = map_rows(
            rows_in,
            ReferenceModel,
            kwargs,
            tmp / "out",
            keys=("reference.actors", "reference.actor_cpus"),
            batch_size=cfg.batch_size,
            actors=cfg.actors,
            actor_cpus=cfg.actor_cpus,
            gpus=1 if device == "cuda" else 0,
        )
        cut = count_true(tmp / "out", "truncated")
        if cut:
            limit = f"model.max_length={max_length}"
            limit += f", max_prompt_length={max_prompt_length}" if max_prompt_length else ""
            print(
                f"[{stage}] {cut} of {rows} rows truncated to {limit} tokens: each prompt keeps its end, each "
                "response its start (data.truncation=keep_end)",
                flush=True,
            )
        write_success(tmp / "out", {"stage": stage, "fingerprint": fp, "rows": {stage: rows}, "truncated": cut})
        promote(tmp / "out", out)
    return rows


def count_true(folder: Path, column: str) -> int:
    """How many rows of a parquet folder have ``column`` true (read from that one column)."""
    import pyarrow.compute as pc

    return sum(
        int(pc.sum(pq.read_table(f, columns=[column]).column(column)).as_py() or 0)
        for f in sorted(Path(folder).glob("*.parquet"))
    )


def reference_input(run_dir: Path) -> Path:
    """``scored/`` when the classify stage finished, else ``data/``."""
    return run_dir / "scored" if read_success(run_dir / "scored") is not None else run_dir / "data"


def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage ``reference``: reference log-probs of every row into ``reference/``."""
    run_dir = Path(run_dir).absolute()
    source = reference_input(run_dir)
    if read_success(source) is None:
        raise FileNotFoundError(f"{source}: no finished rows (_SUCCESS missing); run validate (and classify) first")
    model = initial_policy(cfg, run_dir)
    tok = tokenizer_dir(cfg, run_dir)
    fp = fingerprint(
        "reference",
        (read_success(source) or {}).get("fingerprint"),
        file_fingerprints(model),
        file_fingerprints(tok),
        cfg.model.max_length,
        cfg.model.precision,
        attn_implementation(cfg),
        *(["lora-base"] if cfg.train.lora_r else []),  # the LoRA base's storage dtype (see ReferenceModel)
        *([f"prompt<={cfg.model.max_prompt_length}"] if cfg.model.max_prompt_length else []),
    )
    out = run_dir / "reference"
    if not force and is_done(out, fp):
        return StageResult("reference", {"reference": str(out)}, (read_success(out) or {}).get("rows", {}), True)
    rows = encode_rows(
        source,
        out,
        model_dir=model,
        tokenizer=tok,
        max_length=cfg.model.max_length,
        cfg=cfg.reference,
        stage="reference",
        fp=fp,
        precision=cfg.model.precision,
        attn=attn_implementation(cfg),
        frozen_in_compute_dtype=bool(cfg.train.lora_r),
        pad_to_multiple_of=cfg.model.pad_to_multiple_of,
        max_prompt_length=cfg.model.max_prompt_length,
        logprob_chunk=cfg.model.logprob_chunk,
    )
    truncated = (read_success(out) or {}).get("truncated", 0)
    return StageResult(
        "reference", {"reference": str(out)}, {"reference": rows, "truncated": truncated}, info={"model": str(model)}
    )
