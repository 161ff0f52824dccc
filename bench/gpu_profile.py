"""Profile of the KLDPO LoRA preset's training step at Llama-3.1-8B's shape (random weights), in one process.

``bench/gpu_preset.py`` measures the preset through Ray; this times the same step (``checkpoint.load_policy`` and
``step.train_step``, then the fused AdamW step over the adapters) under several attention layouts, one after another
in the same process, and profiles one step of each with ``torch.profiler``:
- packed sequences with sdpa (the default: a block-diagonal mask over the whole packed row, so sdpa computes every
  block, the masked ones too);
- padded sequences with sdpa (no mask work wasted across sequences, padding tokens instead);
- packed sequences with FlexAttention (a block mask: blocks outside each sequence are skipped).

    python -m bench.gpu_profile --out bench/results                 # CUDA; about two minutes on an H200
    python -m bench.gpu_profile --shape tiny --device cpu --steps 2  # the same path on CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import SHAPES, build_random_model, flops_per_token, matmul_rate, record, synthetic_pairs
from bench.train_speed import trainer_rows
from raydora import train
from raydora.checkpoint import load_policy
from raydora.config import TrainConfig
from raydora.encoding import encode_batch
from raydora.models import train_tokenizer
from raydora.step import StepConfig, collate_micro, train_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--batch", type=int, default=8, help="pairs per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout (after 2 warm-up steps)")
    p.add_argument("--layouts", default="sdpa-packed,sdpa-padded,flex_attention-packed")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    dev = torch.device(args.device)
    amp = torch.bfloat16 if args.device == "cuda" else torch.float32
    work = Path(tempfile.mkdtemp(prefix="gpu-profile-"))
    pairs = synthetic_pairs(args.batch * (args.steps + 3), 150, 250)
    tok = train_tokenizer(iter([t for r in pairs for t in r.values()]), work / "tok", vocab_size=8192)
    build_random_model(args.shape, tok, work / "model", args.device)
    prompt_ids, response_ids = encode_batch(tok, [p["prompt"] for p in pairs],
                                            [[p["chosen"], p["rejected"]] for p in pairs], 1024)  # fmt: skip
    rng = np.random.default_rng(0)  # reference log-probs: their values do not change the work of a step
    rows = trainer_rows(prompt_ids, response_ids, [rng.normal(-600, 5, 2) for _ in pairs])
    t = TrainConfig(loss="dpo", objective="kldpo", beta=0.01, tau=0.01, num_workers=1, batch_size=args.batch, lora_r=16)
    cfg = StepConfig("preference", t, args.batch, args.batch)
    results: dict[str, Any] = {}
    tables: dict[str, str] = {}
    for layout in args.layouts.split(","):
        attn, packing = layout.rsplit("-", 1)
        model = load_policy(work / "model", amp, torch.float32, attn, lora_r=16, lora_alpha=32).to(dev).train()
        opt = train.make_optimizer([q for q in model.parameters() if q.requires_grad], 5e-6, 0.0)

        def step(i: int, model: Any = model, opt: Any = opt, pack: bool = packing == "packed") -> float:
            j = i % (len(pairs) // args.batch)
            mb = collate_micro(rows, slice(j * args.batch, (j + 1) * args.batch), "preference", "dpo",
                               tok.pad_token_id, None, pack=pack)  # fmt: skip
            mb["enc"] = {k: v.to(dev) for k, v in mb["enc"].items()}
            stats = train_step(model, [mb], cfg, device=dev, amp=amp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(stats["tokens"])

        try:
            for i in range(2):
                step(i)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            tic, tokens = time.perf_counter(), 0.0
            for i in range(args.steps):
                tokens += step(2 + i)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - tic) / args.steps
            activities = [torch.profiler.ProfilerActivity.CPU] + (
                [torch.profiler.ProfilerActivity.CUDA] if dev.type == "cuda" else []
            )
            with torch.profiler.profile(activities=activities) as prof:
                step(0)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            tables[layout] = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
            tokens_per_s = tokens / args.steps / seconds
            results[layout] = {
                "step_s": seconds, "tokens_per_step": tokens / args.steps, "tokens_per_s": tokens_per_s,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
            }  # fmt: skip
            print(f"{layout:<24} step {seconds * 1000:7.1f} ms  {tokens_per_s:9.0f} tokens/s", flush=True)
        except Exception as e:  # noqa: BLE001 - one layout failing must not hide the others
            results[layout] = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{layout:<24} failed: {results[layout]['error']}", flush=True)
        del model, opt
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    seq = float(np.mean([len(a) + len(b) for a, rs in zip(rows["prompt_ids"], rows["response_ids"], strict=True)
                         for b in rs]))  # fmt: skip
    peak = None
    if dev.type == "cuda":
        peak = matmul_rate()
        for r in results.values():
            if "tokens_per_s" in r:
                r["mfu_vs_dense_matmul"] = r["tokens_per_s"] * flops_per_token(args.shape, seq, True) / peak
    for layout, table in tables.items():
        print(f"\n== {layout}\n{table}", flush=True)
    out = record("gpu_profile" if dev.type == "cuda" else "gpu_profile_dryrun_cpu",
                 {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "shape": args.shape,
                  "batch_pairs": args.batch, "mean_sequence_tokens": seq, "dense_matmul_flops": peak,
                  "layouts": results, "profiles": tables}, args.out)  # fmt: skip
    print(f"written to {out}")


if __name__ == "__main__":
    main()
