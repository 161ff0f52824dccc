"""The output layer's log-probs with and without chunks (``logprobs.chunked_target_logps``): peak memory and time
of one forward + backward through the LM head, as ratios measured in one run.

The head is where a real vocabulary's memory goes: the full path materialises the logits ``[T, V]`` (upcast to
fp32), the log-softmax's intermediates and, in the backward, the logits' gradient; the chunked path holds
``[chunk, V]`` at a time and recomputes each chunk's logits in the backward. This measures that step alone, the
hidden states and the head weight of an 8B-shaped model (``--hidden 4096``) standing in for the model's last
layer, for vocabularies of 32k and 128k and T = 512 / 2,048 response tokens. It is the building block of
issue 26, which ``model.logprob_chunk`` wires into the model's forward.

``--step`` measures the whole training step instead: one DPO pair (chosen + rejected, a ``--prompt``-token prompt
and ``T`` response tokens each, packed into one row as ``train.packing`` does) through the public
``raydora.train_step`` of a Llama-shaped model of ``--layers`` x ``--hidden`` with a real vocabulary, fp32,
``model.logprob_chunk`` 0 against each of ``--chunks``:

- **memory**: each (chunk, V, T) in a fresh process, gradient buffers allocated before the step; the peak live
  heap (glibc ``mallinfo2``, as ``bench/fsdp_accumulation.py`` reads it) sampled every millisecond by a thread and
  at every module's forward and every decoder layer's backward, and the peak RSS (``VmHWM``); both absolute
  (weights and gradients included) and added by the step;
- **time**: all settings in one process, one step of each in rotation (lockstep), after a warm-up round of each on
  a 128-token pair, the median of ``--steps`` rounds; reported as ratios to ``logprob_chunk=0`` of the same run.

``--what memory`` or ``--what time`` measures one half only (a step takes a minute at 128k x 2,048 on 2 busy cores:
the halves fit a 10-minute invocation each).

``--max-batch`` finds, for the first ``--vocab`` and ``--tokens``, the most pairs per micro-batch whose step's
peak live heap stays under ``--budget-gib``, for ``logprob_chunk=0`` and ``--chunk`` (a fresh process per probe).

- **memory**: each (path, V, T) runs in a fresh process; the number is the peak RSS (``ru_maxrss``) of the step
  minus the RSS before it (weights, hidden states and their gradient buffers allocated first);
- **time**: the two paths alternate in one process (lockstep), the median of ``--steps`` steps each.

    python -m bench.logprob_memory                        # ~3 minutes on 2 cores
    python -m bench.logprob_memory --vocab 32000 --tokens 512 --steps 2   # a quick check
    python -m bench.logprob_memory --step --steps 3 --chunks 512,1024,2048 --out bench/results/step
    python -m bench.logprob_memory --max-batch --vocab 128256 --tokens 512 --chunk 1024 --budget-gib 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from bench.common import PeakSampler, record
from bench.fsdp_accumulation import _live_heap, _peak_rss


def _setup(vocab: int, tokens: int, hidden: int, seed: int = 0) -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(tokens, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,), generator=g)
    return h, w, t


def _step(path: str, h: Any, w: Any, t: Any, chunk: int) -> None:
    from raydora.logprobs import chunked_target_logps

    if path == "full":
        logits = torch.nn.functional.linear(h, w)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, t[:, None]).squeeze(-1)
    else:
        lp = chunked_target_logps(h, w, t, chunk_size=chunk)
    lp.sum().backward()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(args: argparse.Namespace) -> None:
    """One (path, vocab, tokens) in this fresh process: the peak RSS the step adds over what was allocated."""
    torch.set_num_threads(args.threads)
    h, w, t = _setup(args.vocab[0], args.tokens[0], args.hidden)
    h.grad, w.grad = torch.zeros_like(h), torch.zeros_like(w)  # the gradient buffers a training step keeps anyway
    before = _rss_kib()
    _step(args.path, h, w, t, args.chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"added_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}))


def _step_model(vocab: int, hidden: int, layers: int, tokens: int) -> Any:
    """A Llama of ``layers`` x ``hidden`` (8 heads, MLP 2.75x wide, untied head) and a ``vocab``-sized vocabulary,
    random weights, fp32, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
                      max_position_embeddings=max(4096, 2 * tokens), tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def _step_batch(vocab: int, prompt: int, tokens: int, pairs: int, chunk: int, seed: int = 0) -> tuple[Any, Any]:
    """``pairs`` DPO pairs of random ids as one packed micro-batch, and the step's config."""
    import raydora

    rng = np.random.default_rng(seed)
    rows: dict[str, Any] = {k: np.empty(pairs, dtype=object) for k in ("prompt_ids", "response_ids", "scores",
                                                                        "reference_logps")}  # fmt: skip
    for i in range(pairs):
        rows["prompt_ids"][i] = rng.integers(2, vocab, size=prompt)
        rows["response_ids"][i] = [rng.integers(2, vocab, size=tokens) for _ in range(2)]
        rows["scores"][i] = [1.0, 0.0]
        rows["reference_logps"][i] = rng.normal(-10.0 * tokens, 2.0, size=2)
    micro = [raydora.collate_micro(rows, slice(0, pairs), "preference", "dpo", 0, None, pack=True)]
    t = raydora.TrainConfig(batch_size=pairs, micro_batch_size=pairs, num_workers=1)
    return micro, raydora.StepConfig("preference", t, pairs, pairs, logprob_chunk=chunk)


class _HeapPeak(PeakSampler):
    """The live heap's peak, sampled every ``interval`` seconds by a thread and at each :meth:`sample` call."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(interval)
        self.peak = _live_heap()

    def _sample(self) -> int:
        return _live_heap()


def step_child(args: argparse.Namespace) -> None:
    """One training step of one setting in this fresh process: its peak live heap and RSS, absolute and added."""
    import raydora

    torch.set_num_threads(args.threads)
    vocab, tokens = args.vocab[0], args.tokens[0]
    model = _step_model(vocab, args.hidden, args.layers, args.prompt + tokens)
    micro, cfg = _step_batch(vocab, args.prompt, tokens, args.pairs, args.chunk)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # the gradient buffers a training step keeps anyway
    before_heap, before_rss = _live_heap(), _rss_kib() * 1024
    with _HeapPeak() as heap:
        # Every module's forward, every decoder layer's backward (a full backward hook on the head would wrap the
        # chunked head's output, which forward_logps refuses), on top of the thread's samples.
        hooks = [m.register_forward_hook(heap.sample) for m in model.modules()]
        hooks += [layer.register_full_backward_hook(heap.sample) for layer in model.model.layers]
        tic = time.perf_counter()
        raydora.train_step(model, micro, cfg)
        seconds = time.perf_counter() - tic
        for h in hooks:
            h.remove()
    mib = 2**20
    print(json.dumps({"peak_heap_mib": heap.peak / mib, "added_heap_mib": (heap.peak - before_heap) / mib,
                      "peak_rss_mib": _peak_rss() / mib, "added_rss_mib": (_peak_rss() - before_rss) / mib,
                      "before_heap_mib": before_heap / mib, "seconds": seconds}))  # fmt: skip


def _run_child(args: argparse.Namespace, vocab: int, tokens: int, chunk: int, pairs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.logprob_memory", "--step-child", "--vocab", str(vocab), "--tokens",
           str(tokens), "--hidden", str(args.hidden), "--layers", str(args.layers), "--prompt", str(args.prompt),
           "--chunk", str(chunk), "--pairs", str(pairs), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def _r(x: float, digits: int = 0) -> float | None:
    """``x`` rounded, or None for what was not measured (NaN)."""
    return None if x != x else round(float(x), digits)


def step_main(args: argparse.Namespace) -> None:
    """The whole-step table: memory per setting in fresh processes, time in lockstep in this one."""
    import raydora

    torch.set_num_threads(args.threads)
    settings = [0, *args.chunks]
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            nan = {"peak_heap_mib": np.nan, "added_heap_mib": np.nan, "peak_rss_mib": np.nan, "added_rss_mib": np.nan,
                   "before_heap_mib": np.nan}  # fmt: skip
            mem = {c: _run_child(args, vocab, tokens, c, 1) if args.what != "time" else nan for c in settings}
            print(f"V={vocab} T={tokens} memory: {json.dumps(mem)}", flush=True)
            if args.what == "memory":
                args.steps = 0
            model = _step_model(vocab, args.hidden, args.layers, args.prompt + tokens)
            batches = {c: _step_batch(vocab, args.prompt, tokens, 1, c) for c in settings}
            # The warm-up round: the same settings on a short batch (a step here takes a minute at 128k x 2,048).
            warm = {c: _step_batch(vocab, args.prompt, min(tokens, 128), 1, c) for c in settings}
            times: dict[int, list[float]] = {c: [] for c in settings}
            for i in range(args.steps + 1 if args.steps else 0):
                for c in settings:
                    model.zero_grad(set_to_none=True)
                    tic = time.perf_counter()
                    raydora.train_step(model, *(batches[c] if i else warm[c]))
                    if i:  # the first round warms every setting up
                        times[c].append(time.perf_counter() - tic)
                done = " ".join(f"{c}:{v[-1]:.2f}s" for c, v in times.items() if v)
                print(f"V={vocab} T={tokens} round {i}: {done}", flush=True)
            del model, batches
            full_s = statistics.median(times[0]) if times[0] else np.nan
            row: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "full_s": _r(full_s, 3),
                                   "full_s_all": [round(x, 3) for x in times[0]],
                                   "full_peak_heap_mib": _r(mem[0]["peak_heap_mib"]),
                                   "full_added_heap_mib": _r(mem[0]["added_heap_mib"]),
                                   "full_peak_rss_mib": _r(mem[0]["peak_rss_mib"]),
                                   "full_added_rss_mib": _r(mem[0]["added_rss_mib"]),
                                   "weights_and_grads_mib": _r(mem[0]["before_heap_mib"]),
                                   "chunked": {}}  # fmt: skip
            for c in args.chunks:
                s, m = statistics.median(times[c]) if times[c] else np.nan, mem[c]
                row["chunked"][c] = {
                    "s": _r(s, 3), "s_all": [round(x, 3) for x in times[c]], "time_ratio": _r(s / full_s, 3),
                    "time_ratio_paired": _r(statistics.median(a / b for a, b in zip(times[c], times[0], strict=True))
                                            if times[c] else np.nan, 3),
                    "peak_heap_mib": _r(m["peak_heap_mib"]), "added_heap_mib": _r(m["added_heap_mib"]),
                    "peak_rss_mib": _r(m["peak_rss_mib"]), "added_rss_mib": _r(m["added_rss_mib"]),
                    "peak_heap_ratio": _r(mem[0]["peak_heap_mib"] / m["peak_heap_mib"], 2),
                    "added_heap_ratio": _r(mem[0]["added_heap_mib"] / max(m["added_heap_mib"], 1e-9), 2),
                    "peak_rss_ratio": _r(mem[0]["peak_rss_mib"] / m["peak_rss_mib"], 2),
                }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    shape = {"hidden": args.hidden, "layers": args.layers, "prompt": args.prompt, "pairs": 1, "dtype": "float32"}
    meta = {"shape": shape, "threads": args.threads, "steps": args.steps, "what": args.what, "torch": torch.__version__}
    path = record("logprob_memory_step", {"rows": rows, **meta}, args.out)
    print(f"wrote {path}")


def max_batch_main(args: argparse.Namespace) -> None:
    """The most pairs per micro-batch under ``--budget-gib`` of peak live heap, full logits against chunks."""
    vocab, tokens, budget = args.vocab[0], args.tokens[0], args.budget_gib * 1024
    result: dict[str, Any] = {"vocab": vocab, "tokens": tokens, "budget_mib": budget, "probes": {}}
    for chunk in (0, args.chunk):
        probes: dict[int, float] = {}

        def fits(n: int, chunk: int = chunk, probes: dict[int, float] = probes) -> bool:
            if n not in probes:
                probes[n] = _run_child(args, vocab, tokens, chunk, n)["peak_heap_mib"]
                print(f"chunk={chunk} pairs={n} peak_heap_mib={probes[n]:.0f}", flush=True)
            return probes[n] <= budget

        # The peak grows linearly with the pairs: probe 1 and 2, predict the largest that fits, then walk to the
        # boundary (both sides of the answer are measured).
        lo = 0
        if fits(1):
            fits(2)
            slope = probes[2] - probes[1]
            n = max(1, min(args.max_pairs, 1 + int((budget - probes[1]) / max(slope, 1e-9))))
            if fits(n):
                while n < args.max_pairs and fits(n + 1):
                    n += 1
                lo = n
            else:
                while n > 1 and not fits(n - 1):
                    n -= 1
                lo = n - 1
        result[f"max_pairs_chunk{chunk}"] = lo
        result[f"mib_per_pair_chunk{chunk}"] = round(probes[2] - probes[1]) if 2 in probes else None
        result["probes"][chunk] = probes
    result["ratio"] = result[f"max_pairs_chunk{args.chunk}"] / max(result["max_pairs_chunk0"], 1)
    shape = {"hidden": args.hidden, "layers": args.layers, "prompt": args.prompt, "dtype": "float32"}
    print(json.dumps(result), flush=True)
    path = record("logprob_memory_max_batch", {**result, "shape": shape, "chunk": args.chunk,
                                               "threads": args.threads}, args.out)  # fmt: skip
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=lambda s: [int(x) for x in s.split(",")], default=[32000, 128256])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    p.add_argument("--hidden", type=int, default=None, help="head alone: 4096; --step and --max-batch: 512")
    p.add_argument("--chunk", type=int, default=256, help="rows per chunk of the chunked path")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", choices=("full", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--step", action="store_true", help="the whole training step (raydora.train_step), not the head")
    p.add_argument("--max-batch", action="store_true", help="the most pairs per micro-batch under --budget-gib")
    p.add_argument("--chunks", type=lambda s: [int(x) for x in s.split(",")], default=[1024],
                   help="--step: the logprob_chunk settings measured against 0")  # fmt: skip
    p.add_argument("--layers", type=int, default=2, help="--step: decoder layers")
    p.add_argument("--what", choices=("both", "memory", "time"), default="both", help="--step: what to measure")
    p.add_argument("--prompt", type=int, default=64, help="--step: prompt tokens of each pair")
    p.add_argument("--budget-gib", type=float, default=8.0, help="--max-batch: peak live heap budget")
    p.add_argument("--max-pairs", type=int, default=64, help="--max-batch: the most pairs tried")
    p.add_argument("--pairs", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--step-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hidden is None:
        args.hidden = 512 if args.step or args.max_batch or args.step_child else 4096
    if args.child:
        child(args)
        return
    if args.step_child:
        step_child(args)
        return
    if args.step:
        step_main(args)
        return
    if args.max_batch:
        max_batch_main(args)
        return
    torch.set_num_threads(args.threads)
    rows = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            mem = {}
            for path in ("full", "chunked"):
                cmd = [sys.executable, "-m", "bench.logprob_memory", "--child", "--path", path, "--vocab", str(vocab),
                       "--tokens", str(tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                       "--threads", str(args.threads)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                mem[path] = json.loads(out.stdout.strip().splitlines()[-1])["added_mib"]
            h, w, t = _setup(vocab, tokens, args.hidden)
            times: dict[str, list[float]] = {"full": [], "chunked": []}
            for i in range(args.steps + 1):
                for path in ("full", "chunked"):
                    h.grad = w.grad = None
                    tic = time.perf_counter()
                    _step(path, h, w, t, args.chunk)
                    if i:  # the first round warms both up
                        times[path].append(time.perf_counter() - tic)
            full_s, chunked_s = statistics.median(times["full"]), statistics.median(times["chunked"])
            row = {"vocab": vocab, "tokens": tokens, "hidden": args.hidden, "chunk": args.chunk,
                   "full_added_mib": round(mem["full"], 1), "chunked_added_mib": round(mem["chunked"], 1),
                   "memory_ratio": round(mem["full"] / max(mem["chunked"], 1e-9), 2),
                   "full_s": round(full_s, 4), "chunked_s": round(chunked_s, 4),
                   "time_ratio": round(chunked_s / full_s, 3)}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    path = record("logprob_memory", {"rows": rows, "threads": args.threads}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
