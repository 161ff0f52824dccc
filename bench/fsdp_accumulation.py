"""FSDP2 under gradient accumulation: reduce-scatter after every micro-batch, or once per step
(``train.fsdp_grad_sync``). Memory and step time, as ratios measured in one run.

Two gloo ranks on this CPU, each with one torch thread, shard a Llama-shaped model of ``--hidden`` x ``--layers``
(~34M parameters by default) with ``distributed.shard_fsdp`` and run the Ray Train worker's own ``step.train_step``
(plus fused-free AdamW over the sharded parameters) on ``--micro`` micro-batches of ``--micro-rows`` pairs:

- **memory**: each setting runs in fresh processes (a process's peak RSS, ``VmHWM``, only grows), a few steps of
  ERM/DPO; reported per rank, with the bytes of a full and a sharded fp32 gradient for scale. With ``step``, every
  micro-batch but the last leaves the full unsharded gradients on each rank;
- **time**: one process group steps both settings in lockstep (alternating steps on the same model), for DPO
  (linear: the settings differ in the reduce-scatters only, ``--micro`` against 1 a step) and KLDPO (``micro_batch``
  accumulates in one pass with a shared running max; ``step`` needs the window pass, a second forward of every
  micro-batch).

    python -m bench.fsdp_accumulation                   # ~8 minutes on 2 cores
    python -m bench.fsdp_accumulation --steps 3 --layers 2 --hidden 128   # a quick check of the script
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import record

SETTINGS = ("micro_batch", "step")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


@functools.cache
def _mallinfo2() -> Any:
    """glibc's ``mallinfo2``, bound once (None where there is none)."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


def _live_heap() -> int:
    """Bytes malloc has handed out and not had back, in every arena (glibc ``mallinfo2``; 0 elsewhere)."""
    fn = _mallinfo2()
    if fn is None:
        return 0
    info = fn()
    return int(info.uordblks + info.hblkhd)


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _build(args: argparse.Namespace) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75), num_hidden_layers=args.layers,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab,
                      max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).train()


def _micro_batches(args: argparse.Namespace, rank: int, step: int) -> list[dict[str, Any]]:
    from raydora.step import collate_micro

    rng = np.random.default_rng([step, rank])
    n = args.micro * args.micro_rows
    rows: dict[str, Any] = {k: np.empty(n, dtype=object) for k in ("prompt_ids", "response_ids", "scores",
                                                                    "reference_logps")}  # fmt: skip
    for i in range(n):
        rows["prompt_ids"][i] = rng.integers(2, args.vocab, size=args.prompt_len)
        rows["response_ids"][i] = [rng.integers(2, args.vocab, size=args.response_len) for _ in range(2)]
        rows["scores"][i] = [1.0, 0.0]
        rows["reference_logps"][i] = rng.normal(-4.0 * args.response_len, 2.0, size=2)
    return [collate_micro(rows, slice(i, i + args.micro_rows), "preference", "dpo", 0, None, pack=True)
            for i in range(0, n, args.micro_rows)]  # fmt: skip


def _cfg(args: argparse.Namespace, objective: str, sync: str, world: int) -> Any:
    from raydora.config import TrainConfig
    from raydora.step import StepConfig

    t = TrainConfig(
        objective=objective,
        strategy="fsdp",
        fsdp_grad_sync=sync,
        tau=1.0,
        num_workers=world,
        batch_size=world * args.micro * args.micro_rows,
    )
    return StepConfig("preference", t, t.batch_size, args.micro_rows)


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, task: str, out: str) -> None:
    import torch.distributed as dist

    from raydora import distributed, train
    from raydora.step import train_step

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _build(args)
        n_params = sum(p.numel() for p in model.parameters())
        model = distributed.shard_fsdp(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = train.make_optimizer(params, 1e-5, 0.0, sharded=True)
        group, cpu = distributed.default_group(), torch.device("cpu")

        def step(objective: str, sync: str, i: int) -> float:
            cfg = _cfg(args, objective, sync, world)
            micro = _micro_batches(args, rank, i)
            dist.barrier()
            tic = time.perf_counter()
            train_step(model, micro, cfg, group=group, world=world, device=cpu, fsdp=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            return time.perf_counter() - tic

        result: dict[str, Any] = {"parameters": n_params}
        if task in SETTINGS:  # memory: this setting alone in this process
            # The live heap at the start of every micro-batch's forward but the first: what the earlier
            # micro-batches left behind (the gradients, sharded or not).
            held: list[int] = []
            hooks = [model.register_forward_pre_hook(lambda *_: held.append(_live_heap()))]
            # And at every decoder layer's forward and backward: the live heap's peak over the step, the nearest
            # this CPU has to a GPU caching allocator's peak (the RSS peak also counts freed, unreturned memory).
            samples: list[int] = []
            for layer in model.model.layers:
                hooks.append(layer.register_forward_pre_hook(lambda *_: samples.append(_live_heap())))
                hooks.append(layer.register_full_backward_hook(lambda *_: samples.append(_live_heap())))
            for i in range(args.memory_steps):
                start = len(held)
                step("erm", task, i)
                del held[start]  # the first micro-batch of the step: nothing accumulated yet
            for h in hooks:
                h.remove()
            result["peak_rss"] = _peak_rss()
            result["held_between_micro_batches"] = max(held)
            result["peak_live_heap"] = max(samples + held)
        else:  # time: both settings in lockstep, warm-up steps first
            times: dict[str, list[float]] = {f"{o}/{s}": [] for o in ("erm", "kldpo") for s in SETTINGS}
            for i in range(args.warmup + args.steps):
                for key in times:
                    objective, sync = key.split("/")
                    dt = step(objective, sync, i)
                    if i >= args.warmup:
                        times[key].append(dt)
            result["step_s"] = {k: statistics.median(v) for k, v in times.items()}
        torch.save(result, os.path.join(out, f"{task}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(args: argparse.Namespace, task: str, out: Path) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args, task, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"{task}-rank{r}.pt", weights_only=True) for r in range(2)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--micro", type=int, default=4, help="micro-batches per step on each rank")
    p.add_argument("--micro-rows", type=int, default=2, help="pairs per micro-batch")
    p.add_argument("--prompt-len", type=int, default=48)
    p.add_argument("--response-len", type=int, default=48)
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="fsdp-acc-") as tmp:
        memory = {s: _spawn(args, s, Path(tmp)) for s in SETTINGS}
        timing = _spawn(args, "time", Path(tmp))
    n = memory["step"][0]["parameters"]
    peak = {s: max(r["peak_rss"] for r in memory[s]) for s in SETTINGS}
    held = {s: max(r["held_between_micro_batches"] for r in memory[s]) for s in SETTINGS}
    live = {s: max(r["peak_live_heap"] for r in memory[s]) for s in SETTINGS}
    step_s = {k: max(r["step_s"][k] for r in timing) for k in timing[0]["step_s"]}
    result = {
        "torch": torch.__version__, "ranks": 2, "threads_per_rank": 1, "parameters": n,
        "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
        "micro_batches": args.micro, "micro_batch_pairs": args.micro_rows,
        "tokens_per_sequence": args.prompt_len + args.response_len,
        "full_fp32_gradient_mb": n * 4 / 2**20, "sharded_fp32_gradient_mb": n * 4 / 2 / 2**20,
        "live_heap_between_micro_batches_mb": {s: v / 2**20 for s, v in held.items()},
        "live_heap_step_minus_micro_batch_mb": (held["step"] - held["micro_batch"]) / 2**20,
        "peak_live_heap_mb": {s: v / 2**20 for s, v in live.items()},
        "peak_live_heap_step_minus_micro_batch_mb": (live["step"] - live["micro_batch"]) / 2**20,
        "peak_rss_mb": {s: v / 2**20 for s, v in peak.items()},
        "peak_rss_step_minus_micro_batch_mb": (peak["step"] - peak["micro_batch"]) / 2**20,
        "peak_rss_micro_batch_vs_step": peak["micro_batch"] / peak["step"],
        "step_s": step_s,
        "dpo_step_micro_batch_vs_step": step_s["erm/micro_batch"] / step_s["erm/step"],
        "kldpo_step_micro_batch_vs_step": step_s["kldpo/micro_batch"] / step_s["kldpo/step"],
    }  # fmt: skip
    for k in ("parameters", "full_fp32_gradient_mb", "live_heap_between_micro_batches_mb",
              "live_heap_step_minus_micro_batch_mb", "peak_live_heap_mb", "peak_live_heap_step_minus_micro_batch_mb",
              "peak_rss_mb", "peak_rss_step_minus_micro_batch_mb",
              "peak_rss_micro_batch_vs_step", "step_s", "dpo_step_micro_batch_vs_step",
              "kldpo_step_micro_batch_vs_step"):  # fmt: skip
        print(f"{k:<36} {result[k]}", flush=True)
    print(f"written to {record('fsdp_accumulation', result, args.out)}", flush=True)


if __name__ == "__main__":
    main()
