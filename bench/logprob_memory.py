"""The output layer's log-probs with and without chunks (``logprobs.chunked_target_logps``): peak memory and time
of one forward + backward through the LM head, as ratios measured in one run.

The head is where a real vocabulary's memory goes: the full path materialises the logits ``[T, V]`` (upcast to
fp32), the log-softmax's intermediates and, in the backward, the logits' gradient; the chunked path holds
``[chunk, V]`` at a time and recomputes each chunk's logits in the backward. This measures that step alone, the
hidden states and the head weight of an 8B-shaped model (``--hidden 4096``) standing in for the model's last
layer, for vocabularies of 32k and 128k and T = 512 / 2,048 response tokens. It is the building block of
issue 26, which ``model.logprob_chunk`` wires into the model's forward; the whole training step is not timed here.

- **memory**: each (path, V, T) runs in a fresh process; the number is the peak RSS (``ru_maxrss``) of the step
  minus the RSS before it (weights, hidden states and their gradient buffers allocated first);
- **time**: the two paths alternate in one process (lockstep), the median of ``--steps`` steps each.

    python -m bench.logprob_memory                        # ~3 minutes on 2 cores
    python -m bench.logprob_memory --vocab 32000 --tokens 512 --steps 2   # a quick check
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

import torch

from bench.common import record


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=lambda s: [int(x) for x in s.split(",")], default=[32000, 128256])
    p.add_argument("--tokens", type=lambda s: [int(x) for x in s.split(",")], default=[512, 2048])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=256, help="rows per chunk of the chunked path")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path (after one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--path", choices=("full", "chunked"), help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if args.child:
        child(args)
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
