"""GPU benchmarks (issue 9's GPU run, issue 7's hf path on a GPU), all measured in one process and one run:

- the dense bf16 matmul rate of this GPU (8192^3 products on random data, CUDA events, median): the ceiling;
- raydora's training step (the same ``step.train_step`` the Ray Train workers run) with bf16 autocast on a
  GPT-2-small-shaped model (768 wide, 12 layers), for DPO (ERM), DoRA, KLDPO and WDPO: pairs/s, tokens/s, the
  robust objectives' overhead, precomputed reference log-probs against a reference forward in every step, and
  model FLOPs utilisation against the measured matmul rate;
- generation: raydora's hf backend (``HFGenerator``) against a bare batched ``generate`` loop, bf16, same model,
  prompts and batches; and raydora's vllm backend (``VLLMGenerator``: vLLM's defaults on CUDA, torch.compile and
  CUDA graphs) where vLLM is installed. Greedy decoding; each engine is built before its timed rounds. With
  ``--shape llama3-8b`` the three engines run a Llama-3.1-8B-shaped model (random weights, built on the GPU).

    python -m bench.gpu_speed --out bench/results          # on a CUDA machine; about two minutes on an H100
    python -m bench.gpu_speed --generation-only            # the generation comparison alone
    python -m bench.gpu_speed --generation-only --shape llama3-8b --prompts 512 --new-tokens 128 --vllm-memory 0.6
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import SHAPES, build_random_model, dense_matmul_flops, matmul_rate, model_flops_per_token, record
from bench.generate_speed import Engine, bare_loop, prompts
from bench.train_speed import Ours, lockstep, make_pairs
from raydora import models as M
from raydora.models import build_model, count_parameters, load_causal_lm, save_pretrained, train_tokenizer


def register_gpt2_small_shape() -> None:
    """Add the ``gpt2-124m-shape`` model preset (GPT-2 small's shape: 124M parameters with GPT-2's 50k vocabulary;
    about 86M with the benchmark's 512 tokens) to ``raydora.models.PRESETS``, once, when the script runs."""
    M.PRESETS.setdefault("gpt2-124m-shape", M._gpt2(768, layers=12, heads=12))


def main() -> None:
    register_gpt2_small_shape()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m-shape")
    p.add_argument("--pairs", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128, help="pairs per optimizer step (one micro-batch)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompts", type=int, default=1024)
    p.add_argument("--gen-batch", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--device", default="cuda", help="cpu: a dry run of this script (fp32), for checking it")
    p.add_argument("--generation-only", action="store_true", help="leave out the training-step benchmarks")
    p.add_argument("--backends", default="loop,hf,vllm", help="generation backends (vllm where it is installed)")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="with --generation-only: a Llama model of a bench.common.SHAPES shape (random weights, built "
                        "on the device) instead of --preset")  # fmt: skip
    p.add_argument("--vllm-batch", type=int, default=0, help="prompts per vLLM call (0: --gen-batch)")
    p.add_argument(
        "--vllm-memory",
        type=float,
        default=None,
        help="vLLM's gpu_memory_utilization (the other engines' models stay loaded while it starts)",
    )
    args = p.parse_args()
    if args.shape and not args.generation_only:
        p.error("--shape is for the generation comparison: add --generation-only")
    dev = args.device
    if dev == "cuda":
        assert torch.cuda.is_available(), "gpu_speed.py needs a CUDA GPU (or --device cpu for a dry run)"
        peak, amp, precision, gpu = matmul_rate(), torch.bfloat16, "bf16", torch.cuda.get_device_name()
    else:
        peak, amp, precision, gpu = dense_matmul_flops(torch.get_num_threads()), torch.float32, "fp32", "cpu"
    print(f"{gpu}: dense {precision} matmul {peak / 1e12:.2f} TFLOP/s", flush=True)

    pairs = make_pairs(args.pairs, seed=0)
    texts = [t for r in pairs for t in (r["prompt"], r["chosen"], r["rejected"])]
    work = Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    tok = train_tokenizer(iter(texts), work / "tok", vocab_size=512)
    if args.shape:
        params = build_random_model(args.shape, tok, work / "model", dev)
        model_dir = work / "model"
    else:
        model_dir = save_pretrained(build_model(args.preset, tok, seed=0), tok, work / "model")
        params = count_parameters(load_causal_lm(model_dir))
    result: dict[str, Any] = {"device": gpu, "torch": torch.__version__, "preset": args.shape or args.preset,
                              "parameters": params, "dense_bf16_matmul_flops": peak}  # fmt: skip
    ratios: dict[str, float] = {}
    if not args.generation_only:
        training = train_steps(args, model_dir, tok, pairs, dev, amp, peak)
        ratios.update(training.pop("ratios"))
        result.update(training)

    gen: dict[str, Any] = {}
    texts_gen = prompts(args.prompts)
    wanted = args.backends.split(",")
    fns: dict[str, Any] = {}
    if "loop" in wanted:
        fns["loop"] = lambda: bare_loop(model_dir, texts_gen, args.new_tokens, args.gen_batch, dev, precision)
    if "hf" in wanted:
        fns["hf_engine"] = Engine(model_dir, texts_gen, args.new_tokens, args.gen_batch, "hf", device=dev,
                                  precision=precision)  # fmt: skip
    if "vllm" in wanted and importlib.util.find_spec("vllm") is not None:
        # vLLM's defaults on CUDA (compiled, CUDA graphs); eager on CPU, where the CPU build runs it.
        fns["vllm_engine"] = Engine(model_dir, texts_gen, args.new_tokens, args.vllm_batch or args.gen_batch, "vllm",
                                    eager=dev != "cuda", device=dev, precision=precision,
                                    gpu_memory=args.vllm_memory)  # fmt: skip
    names = list(fns)
    for r in range(2):  # two rounds, the order reversed in the second; the best round counts
        for name in names if r == 0 else names[::-1]:
            tic = time.perf_counter()
            tokens, seconds = fns[name]()
            gen.setdefault(name, []).append({"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds})
            print(f"round {r} {name:<11} {tokens} tokens in {seconds:6.2f} s ({time.perf_counter() - tic:.1f} s wall)",
                  flush=True)  # fmt: skip
    for fn in fns.values():
        if isinstance(fn, Engine):
            fn.close()
    best_gen = {k: max(x["tokens_per_s"] for x in v) for k, v in gen.items()}
    if "hf_engine" in best_gen and "loop" in best_gen:
        ratios["hf_engine_vs_loop"] = best_gen["hf_engine"] / best_gen["loop"]
    if "vllm_engine" in best_gen and "hf_engine" in best_gen:
        ratios["vllm_engine_vs_hf_engine"] = best_gen["vllm_engine"] / best_gen["hf_engine"]
    result["generation"] = {"prompts": args.prompts, "new_tokens": args.new_tokens, "batch": args.gen_batch,
                            "vllm_batch": args.vllm_batch or args.gen_batch,
                            "precision": precision, "best_tokens_per_s": best_gen, "runs": gen}  # fmt: skip
    result["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k:<28} {v:.3f}")
    tag = ("gpu_speed" if dev == "cuda" else "gpu_speed_dryrun_cpu") + ("_generation" if args.generation_only else "")
    tag += f"_{args.shape}" if args.shape else ""
    print(f"written to {record(tag, result, args.out)}")


def train_steps(args: argparse.Namespace, model_dir: Path, tok: Any, pairs: list[dict[str, str]], dev: str,
                amp: torch.dtype, peak: float) -> dict[str, Any]:  # fmt: skip
    """The training-step benchmarks (every objective in lockstep): runs, MFU and the step ratios."""
    args.threads = 0
    sdpa = Ours(model_dir, tok, pairs, args, "sdpa", device=dev, amp=amp)
    eager = Ours(model_dir, tok, pairs, args, "eager", device=dev, amp=amp)
    steppers = {f"raydora_{o}": (eager if o == "wdpo" else sdpa).stepper(o) for o in ("erm", "dora", "kldpo", "wdpo")}
    steppers["raydora_dpo_eager"] = eager.stepper("erm")
    steppers["raydora_dpo_padded"] = sdpa.stepper("erm", pack=False)
    steppers["raydora_dpo_ref_forward"] = sdpa.stepper("erm", ref_forward=True)
    runs = lockstep(steppers, args.steps, args.warmup, args.batch)
    del steppers
    if dev == "cuda":
        torch.cuda.empty_cache()
    seq = float(np.mean([len(pi) + len(r) for pi, rs in zip(sdpa.prompt_ids, sdpa.response_ids, strict=True)
                         for r in rs]))  # fmt: skip
    ours = runs["raydora_erm"]
    achieved = ours["tokens_per_s"] * model_flops_per_token(load_causal_lm(model_dir), seq)
    ratios = {
        "mfu_vs_dense_matmul": achieved / peak,
        "packed_vs_padded": ours["pairs_per_s"] / runs["raydora_dpo_padded"]["pairs_per_s"],
        "precomputed_vs_ref_forward": ours["pairs_per_s"] / runs["raydora_dpo_ref_forward"]["pairs_per_s"],
        "dora_step_vs_dpo": runs["raydora_dora"]["step_s"] / ours["step_s"],
        "kldpo_step_vs_dpo": runs["raydora_kldpo"]["step_s"] / ours["step_s"],
        "wdpo_step_vs_dpo": runs["raydora_wdpo"]["step_s"] / ours["step_s"],
        "wdpo_step_vs_dpo_eager": runs["raydora_wdpo"]["step_s"] / runs["raydora_dpo_eager"]["step_s"],
    }
    for k, v in runs.items():
        print(f"{k:<28} {v['pairs_per_s']:9.1f} pairs/s {v['tokens_per_s']:11.0f} tokens/s  "
              f"step {v['step_s'] * 1000:7.1f} ms", flush=True)  # fmt: skip
    precision = "bf16" if amp == torch.bfloat16 else "fp32"
    return {"batch_pairs": args.batch, "precision": f"{precision} autocast, fp32 weights",
            "achieved_model_flops": achieved, "mean_sequence_tokens": seq,
            "train_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
            "runs": runs, "ratios": ratios}  # fmt: skip


if __name__ == "__main__":
    main()
