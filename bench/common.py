"""What the benchmark scripts share, in one place (scripts import it; it imports no script):

- measuring: peak memory of a process tree (driver + local Ray workers) and of the GPU (nvidia-smi), each sampled
  in a thread; the dense matmul rate of the GPU (bf16) and of the CPU (fp32), the ceilings of MFU;
- models: Llama shapes (``SHAPES``: Llama-3.1-8B and a tiny one) built with random weights, and training FLOPs per
  token of a Llama shape and of a GPT-2 model;
- data: pairs of pseudo-words at realistic lengths;
- recording a result in ``bench/results/<name>.json``.

torch and transformers are imported inside the functions that use them, so the CPU scripts that import this
module for ``record`` and ``PeakRSS`` do not load them.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import psutil

if TYPE_CHECKING:
    import torch

# Llama-3.1-8B's architecture (config.json of meta-llama/Llama-3.1-8B-Instruct, rope scaling left out: it changes
# no FLOPs) and a tiny one of the same family for the CPU dry runs.
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
                      max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=2048, tie_word_embeddings=False),
}  # fmt: skip


def _process_kind(p: psutil.Process) -> str:
    """A short name for a process of a Ray tree: its Ray title (``ray::RayTrainWorker``), or its program."""
    try:
        title = p.name()
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if title.startswith("ray::"):
        return title
    for arg in cmd[:3]:
        if arg.endswith(".py") or "/ray/" in arg:
            return Path(arg).name
    return title


class PeakSampler:
    """The largest value of :meth:`_sample` while the context is open, kept in ``peak``: a thread samples every
    ``interval`` seconds, and :meth:`sample` (e.g. from a module hook) and the context's end sample once more."""

    def __init__(self, interval: float) -> None:
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        raise NotImplementedError

    def sample(self, *_: object) -> None:
        self.peak = max(self.peak, self._sample())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


class PeakRSS(PeakSampler):
    """Samples the summed RSS of a process (default: this one) and all its descendants (raylet, Ray workers) every
    ``interval`` seconds; ``peak`` is the largest sum seen. Shared pages count once per process: use it for ratios.
    With ``pss=True`` it also sums PSS (shared pages divided among the processes sharing them: the tree's real
    footprint) into ``peak_pss``; reading it costs more per sample."""

    def __init__(self, interval: float = 0.1, pid: int | None = None, pss: bool = False) -> None:
        super().__init__(interval)
        self.pid, self.pss = pid or os.getpid(), pss
        self.peak_pss = self.peak_processes = 0
        self.peak_parts: list[tuple[str, int]] = []  # (process kind, PSS) at the PSS peak
        self.peak_at = 0.0  # when the PSS peak was seen (time.time())

    def _sample(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0
        rss = pss = 0
        seen: list[tuple[psutil.Process, int]] = []
        for p in procs:
            try:
                m = p.memory_full_info() if self.pss else p.memory_info()
            except psutil.Error:
                continue
            rss, pss = rss + m.rss, pss + getattr(m, "pss", m.rss)
            seen.append((p, getattr(m, "pss", m.rss)))
        if self.pss and pss > self.peak_pss:  # label the processes only at a new peak
            self.peak_pss, self.peak_at = pss, time.time()
            self.peak_parts = [(_process_kind(p), b) for p, b in seen]
        self.peak_processes = max(self.peak_processes, len(procs))
        return rss


def record(name: str, result: dict[str, Any], out_dir: str | Path = "bench/results") -> Path:
    """Write ``result`` to ``bench/results/<name>.json`` (with the machine it ran on) and return the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"bench": name, "cpus": os.cpu_count(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


class GpuMemory:
    """Peak GPU memory in use (MiB, every process) from nvidia-smi, polled each second in a thread. Each new peak is
    also written to ``path`` (when given), so a run killed from outside still leaves it for ``--summarize``."""

    def __init__(self, path: Path | None = None) -> None:
        self.peak, self.path, self._stop = 0, path, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout  # fmt: skip
                peak = max([self.peak] + [int(x) for x in out.split()])
            except (OSError, ValueError, subprocess.TimeoutExpired):
                return
            if peak > self.peak and self.path is not None:
                self.path.write_text(f"{peak}\n")
            self.peak = peak
            self._stop.wait(1.0)

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()


def matmul_rate(n: int = 8192, reps: int = 20, dtype: torch.dtype | None = None) -> float:
    """FLOP/s of an n^3 matmul on random CUDA data (``dtype``: bf16 by default): median of ``reps`` products timed
    with CUDA events."""
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return 2 * n**3 / statistics.median(times)


def dense_matmul_flops(threads: int, n: int = 1024, reps: int = 20) -> float:
    """FLOP/s of an fp32 n^3 matmul on the CPU with ``threads`` torch threads (sets torch's thread count)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    tic = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - tic)


def build_random_model(shape: str, tok: Any, out: Path, device: str) -> int:
    """The shape with random weights, built on ``device`` (an 8B model initialises in seconds on a GPU) and saved
    as bf16 (GPU) or fp32 safetensors with its tokenizer. Returns the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydora.models import save_pretrained

    cfg = LlamaConfig(**SHAPES[shape], pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    n = sum(p.numel() for p in model.parameters())
    save_pretrained(model, tok, out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return n


def flops_per_token(shape: str, seq: float, lora: bool) -> float:
    """Training FLOPs per token of a ``SHAPES`` Llama: (4 with LoRA, else 6) x the matmul parameters (projections,
    MLP, LM head) plus attention's score and value products, 12 x layers x width x sequence length (forward and
    backward)."""
    s = SHAPES[shape]
    h, layers, heads, kv = s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"], s["num_key_value_heads"]
    kv_width = h // heads * kv
    per_layer = 2 * h * h + 2 * h * kv_width + 3 * h * s["intermediate_size"]
    matmul = layers * per_layer + h * s["vocab_size"]
    return (4 if lora else 6) * matmul + 12 * layers * h * seq


def model_flops_per_token(model: Any, seq_len: float) -> float:
    """Training FLOPs per token of a GPT-2 model (forward + backward = 3x forward): 6 x the matmul parameters
    (blocks and LM head) plus the attention score/value products, 12 x layers x width x sequence length."""
    c = model.config
    d, layers, vocab = c.n_embd, c.n_layer, c.vocab_size
    matmul_params = 12 * layers * d * d + d * vocab
    return 6 * matmul_params + 12 * layers * d * seq_len


def pseudo_words(rng: np.random.Generator, n: int = 3000) -> list[str]:
    """``n`` made-up words of one to three syllables (the tokenizer splits them)."""
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da", "fu", "go", "hi", "ja", "po", "ze"]
    return ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(n)]


def synthetic_pairs(rows: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict[str, str]]:
    """TRL-layout pairs of pseudo-words, lengths jittered by +-25% (made-up words, so the tokenizer splits them)."""
    rng = np.random.default_rng(seed)
    words = pseudo_words(rng)

    def text(n: int) -> str:
        return " ".join(rng.choice(words, size=max(1, int(n * rng.uniform(0.75, 1.25)))))

    return [{"prompt": text(prompt_words), "chosen": text(response_words), "rejected": text(response_words)}
            for _ in range(rows)]  # fmt: skip
