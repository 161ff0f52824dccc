"""Training-step throughput, all measured in one process and one run (ratios only; this machine is noisy):

- raydora's DPO step against TRL's ``DPOTrainer`` on the same model, pairs, batch and lengths: TRL configured
  fairly (fp32, no gradient checkpointing, the same attention kernel), with a reference forward each step and
  with ``precompute_ref_log_probs=True``; TRL's own defaults (bf16, gradient checkpointing) are recorded apart;
- the robust objectives' step time against plain DPO (DoRA, KLDPO, WDPO exact and by finite difference), in one
  micro-batch and with gradient accumulation (``--micro`` rows per micro-batch: one pass against the window pass);
- precomputed reference log-probs against a reference forward in every step;
- model FLOPs utilisation of the DPO step against a dense fp32 matmul timed in the same run.

    .venv/bin/python -m bench.train_speed            # ~10M-parameter GPT-2, batch 16 pairs, fp32, 2 threads
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import dense_matmul_flops, model_flops_per_token, record
from raydora import synth, train
from raydora.config import TrainConfig
from raydora.encoding import encode_batch, forward_logps, pad_sequences, render_prompt
from raydora.hardware import autocast
from raydora.models import build_model, count_parameters, load_causal_lm, save_pretrained, train_tokenizer
from raydora.step import StepConfig, collate_micro, train_step


def make_pairs(n: int, seed: int) -> list[dict[str, Any]]:
    """Benchmark pairs: each synthetic row's best and worst response by its (biased) label."""
    shares = {"golden": 0.25, "verbose": 0.375, "sloppy": 0.375}
    rows = list(synth.generate_rows(0, n, k=4, shares=shares, label_noise=0.0, seed=seed))
    out = []
    for r in rows:
        best, worst = int(np.argmax(r["scores"])), int(np.argmin(r["scores"]))
        out.append({"prompt": r["prompt"], "chosen": r["responses"][best], "rejected": r["responses"][worst]})
    return out


OBJECTIVES = ("erm", "dora", "kldpo", "wdpo")


def trainer_rows(prompt_ids: list[Any], response_ids: list[Any], ref: Any) -> dict[str, Any]:
    """Pairs (chosen first) in the Ray Train workers' batch layout: object arrays of token ids, scores, reference
    log-probs, and fixed ``p_golden`` / ``sources`` for DoRA."""
    n = len(prompt_ids)
    return {
        "prompt_ids": np.array([np.asarray(p) for p in prompt_ids] + [None], dtype=object)[:-1],
        "response_ids": np.array([[np.asarray(r) for r in rs] for rs in response_ids] + [None], dtype=object)[:-1],
        "scores": np.array([[1.0, 0.0]] * n + [None], dtype=object)[:-1],
        "reference_logps": np.array([*ref, None], dtype=object)[:-1],
        "p_golden": np.array([[0.7, 0.3]] * n + [None], dtype=object)[:-1],
        "sources": np.array([["golden", "verbose"]] * n + [None], dtype=object)[:-1],
    }


class Ours:
    """raydora's training step (the same ``step.train_step`` the Ray Train workers run), single process."""

    def __init__(self, model_dir: Path, tok: Any, pairs: list[dict[str, Any]], args: Any, attn: str,
                 device: str = "cpu", amp: Any = torch.float32) -> None:  # fmt: skip
        self.tok, self.args = tok, args
        self.device, self.amp = torch.device(device), amp
        prompts = [p["prompt"] for p in pairs]
        responses = [[p["chosen"], p["rejected"]] for p in pairs]
        self.prompt_ids, self.response_ids = encode_batch(tok, prompts, responses, args.max_length)
        self.model_dir, self.attn = model_dir, attn
        ref = load_causal_lm(model_dir, dtype=torch.float32, attn_implementation=attn).to(self.device).eval()
        self.ref_logps = self.reference_logps(ref, range(len(pairs)))

    def reference_logps(self, ref: Any, idx: Any) -> np.ndarray:
        idx = list(idx)
        enc = pad_sequences([self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx], None,
                            self.tok.pad_token_id)  # fmt: skip
        enc = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad(), autocast(self.device.type, self.amp):
            lp, _, _ = forward_logps(ref, enc, 2)
        return lp.double().cpu().numpy()

    def rows(self, idx: list[int], ref: np.ndarray) -> dict[str, Any]:
        return trainer_rows([self.prompt_ids[i] for i in idx], [self.response_ids[i] for i in idx], ref)

    def stepper(self, objective: str, ref_forward: bool = False, pack: bool = True, micro: int = 0,
                **train_kw: Any) -> Any:  # fmt: skip
        """A generator: each ``next()`` runs one training step and yields ``(seconds, tokens)``. ``micro``: rows
        per micro-batch (gradient accumulation; 0: the whole batch in one)."""
        a = self.args
        micro = micro or a.batch
        torch.manual_seed(0)
        model = load_causal_lm(self.model_dir, dtype=torch.float32, attn_implementation=self.attn)
        model = model.to(self.device).train()
        ref = copy.deepcopy(model).eval() if ref_forward else None
        tc = TrainConfig(objective=objective, loss="dpo", lam=1.0, tau=1.0, kldpo_clip=None, rho=0.01,
                         batch_size=a.batch, micro_batch_size=micro, num_workers=1, **train_kw)  # fmt: skip
        cfg = StepConfig("preference", tc, a.batch, micro)
        dora = {"shares": {"verbose": 0.75}, "gammas": {"verbose": 1.0}, "alpha": 0.25} if objective == "dora" else None
        opt = train.make_optimizer(list(model.parameters()), 1e-5, 0.0)
        n = len(self.prompt_ids)
        s = 0
        while True:
            idx = [(s * a.batch + i) % n for i in range(a.batch)]
            tic = time.perf_counter()
            ref_lp = self.reference_logps(ref, idx) if ref is not None else self.ref_logps[idx]
            rows = self.rows(idx, ref_lp)
            mbs = [collate_micro(rows, slice(i, i + micro), "preference", "dpo", self.tok.pad_token_id, dora,
                                 pack) for i in range(0, a.batch, micro)]  # fmt: skip
            for mb in mbs:
                mb["enc"] = {k: v.to(self.device) for k, v in mb["enc"].items()}
            stats = train_step(model, mbs, cfg, device=self.device, amp=self.amp)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            yield time.perf_counter() - tic, stats["tokens"]
            s += 1


def lockstep(steppers: dict[str, Any], steps: int, warmup: int, batch: int) -> dict[str, dict[str, Any]]:
    """Run the configurations step by step in rotation (step s of every one before step s+1 of any), so slow
    phases of a noisy machine hit them all alike; median step time per configuration."""
    names = list(steppers)
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[float]] = {n: [] for n in names}
    for s in range(warmup + steps):
        for n in names[s % len(names) :] + names[: s % len(names)]:
            dt, tok = next(steppers[n])
            if s >= warmup:
                times[n].append(dt)
                tokens[n].append(tok)
    out = {}
    for n in names:
        step = statistics.median(times[n])
        out[n] = {"step_s": step, "pairs_per_s": batch / step, "tokens_per_s": statistics.median(tokens[n]) / step,
                  "steps_timed": steps}  # fmt: skip
    return out


def run_trl(model_dir: Path, tok: Any, pairs: list[dict[str, Any]], args: Any, *, precompute: bool,
            trl_defaults: bool = False, attn: str = "sdpa") -> dict[str, Any]:  # fmt: skip
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.tic = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.tic)

    rows = [{"prompt": render_prompt(tok, p["prompt"]), "chosen": p["chosen"], "rejected": p["rejected"]}
            for p in pairs]  # fmt: skip
    model = load_causal_lm(model_dir, dtype=torch.float32, attn_implementation=attn)
    out = tempfile.mkdtemp(prefix="trl-bench-")
    fair = {} if trl_defaults else {"bf16": False, "gradient_checkpointing": False}
    config = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
        max_length=args.max_length, learning_rate=1e-5, beta=0.1, precompute_ref_log_probs=precompute,
        report_to=[], logging_steps=10_000, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        seed=0, disable_tqdm=True, **fair,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Timer()])  # fmt: skip
    trainer.train()
    step = statistics.median(times[args.warmup :])
    return {"step_s": step, "pairs_per_s": args.batch / step, "steps_timed": len(times[args.warmup :]),
            "bf16": config.bf16, "gradient_checkpointing": config.gradient_checkpointing}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="base-gpt2")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=4, help="rows per micro-batch in the gradient-accumulation runs")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="repeat every configuration, alternating the order")
    p.add_argument("--skip-trl-defaults", action="store_true", help="skip TRL's slow bf16 + checkpointing defaults")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pairs = make_pairs(args.pairs, seed=0)
    texts = [t for r in pairs for t in (r["prompt"], r["chosen"], r["rejected"])]
    tok = train_tokenizer(iter(texts), vocab_size=512)
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    save_pretrained(build_model(args.preset, tok, seed=0), tok, work / "model")
    model_dir = work / "model"
    params = count_parameters(load_causal_lm(model_dir))
    results: dict[str, Any] = {"preset": args.preset, "parameters": params, "batch_pairs": args.batch,
                               "max_length": args.max_length, "threads": args.threads, "precision": "fp32",
                               "micro": args.micro, "rounds": args.rounds}  # fmt: skip

    # raydora as it runs by default (model.attn_implementation=auto): sdpa, and eager for WDPO (double backward),
    # packed sequences. TRL gets the better of its default kernel (sdpa) and eager, per configuration.
    sdpa = Ours(model_dir, tok, pairs, args, "sdpa")
    eager = Ours(model_dir, tok, pairs, args, "eager")
    trl_jobs: dict[str, Any] = {}
    for attn in ("sdpa", "eager"):
        trl_jobs[f"trl_fair_ref_forward_{attn}"] = lambda a=attn: run_trl(
            model_dir, tok, pairs, args, precompute=False, attn=a
        )
        trl_jobs[f"trl_fair_precomputed_{attn}"] = lambda a=attn: run_trl(
            model_dir, tok, pairs, args, precompute=True, attn=a
        )
    if not args.skip_trl_defaults:
        trl_jobs["trl_defaults"] = lambda: run_trl(model_dir, tok, pairs, args, precompute=False, trl_defaults=True)
    # raydora's configurations run in lockstep (the robust-overhead ratios compare steps taken side by side).
    # TRL's trainer runs whole: each configuration runs once per round, rounds alternate the order, and each
    # configuration (ours too) keeps its best round: background load only ever slows a run down.
    runs: dict[str, dict[str, Any]] = {}
    flops = 0.0
    for r in range(args.rounds):
        flops = max(flops, dense_matmul_flops(args.threads))
        steppers = {f"raydora_{o}": (eager if o == "wdpo" else sdpa).stepper(o) for o in OBJECTIVES}
        steppers["raydora_dpo_eager"] = eager.stepper("erm")
        # WDPO with the penalty's gradient by a finite difference: no double backward, so sdpa (the default).
        steppers["raydora_wdpo_fd"] = sdpa.stepper("wdpo", wdpo_grad="finite_difference")
        steppers["raydora_dpo_padded"] = sdpa.stepper("erm", pack=False)
        steppers["raydora_dpo_ref_forward"] = sdpa.stepper("erm", ref_forward=True)
        # Gradient accumulation (micro-batches of --micro rows): the log-sum-exp objectives in one pass (online
        # softmax, the default) and with the window pass (one more forward per micro-batch).
        for o in ("erm", "dora", "kldpo"):
            steppers[f"raydora_{o}_micro"] = sdpa.stepper(o, micro=args.micro)
        for o in ("dora", "kldpo"):
            steppers[f"raydora_{o}_micro_window"] = sdpa.stepper(o, micro=args.micro, accumulation="window")
        batches = [lambda st=steppers: lockstep(st, args.steps, args.warmup, args.batch)]
        batches += [(lambda n=n: {n: trl_jobs[n]()}) for n in trl_jobs]
        for job in batches if r % 2 == 0 else batches[::-1]:
            for name, got in job().items():
                if name not in runs or got["step_s"] < runs[name]["step_s"]:
                    runs[name] = got
        del steppers, batches
    flops = max(flops, dense_matmul_flops(args.threads))
    ours = runs["raydora_erm"]

    def best_trl(kind: str) -> dict[str, Any]:
        return min((runs[f"trl_fair_{kind}_{a}"] for a in ("sdpa", "eager")), key=lambda r: r["step_s"])

    seq = float(np.mean([len(pi) + len(r) for pi, rs in zip(sdpa.prompt_ids, sdpa.response_ids, strict=True)
                         for r in rs]))  # fmt: skip
    model = load_causal_lm(model_dir)
    achieved = ours["tokens_per_s"] * model_flops_per_token(model, seq)
    ratios = {
        "ours_vs_trl_fair_ref_forward": ours["pairs_per_s"] / best_trl("ref_forward")["pairs_per_s"],
        "ours_vs_trl_fair_precomputed": ours["pairs_per_s"] / best_trl("precomputed")["pairs_per_s"],
        "packed_vs_padded": ours["pairs_per_s"] / runs["raydora_dpo_padded"]["pairs_per_s"],
        "precomputed_vs_ref_forward": ours["pairs_per_s"] / runs["raydora_dpo_ref_forward"]["pairs_per_s"],
        "dora_step_vs_dpo": runs["raydora_dora"]["step_s"] / ours["step_s"],
        "kldpo_step_vs_dpo": runs["raydora_kldpo"]["step_s"] / ours["step_s"],
        "wdpo_step_vs_dpo": runs["raydora_wdpo"]["step_s"] / ours["step_s"],
        "wdpo_step_vs_dpo_eager": runs["raydora_wdpo"]["step_s"] / runs["raydora_dpo_eager"]["step_s"],
        "wdpo_finite_difference_step_vs_dpo": runs["raydora_wdpo_fd"]["step_s"] / ours["step_s"],
        "mfu_vs_dense_matmul": achieved / flops,
    }
    for o in ("dora", "kldpo"):
        base = runs["raydora_erm_micro"]["step_s"]
        ratios[f"{o}_step_vs_dpo_micro"] = runs[f"raydora_{o}_micro"]["step_s"] / base
        ratios[f"{o}_window_step_vs_dpo_micro"] = runs[f"raydora_{o}_micro_window"]["step_s"] / base
    if "trl_defaults" in runs:
        ratios["ours_vs_trl_defaults"] = ours["pairs_per_s"] / runs["trl_defaults"]["pairs_per_s"]
    results.update({"runs": runs, "ratios": ratios, "dense_matmul_flops": flops, "achieved_model_flops": achieved,
                    "mean_sequence_tokens": seq})  # fmt: skip
    path = record("train_speed", results)
    for k, v in runs.items():
        print(f"{k:<32} {v['pairs_per_s']:8.1f} pairs/s  step {v['step_s'] * 1000:7.1f} ms")
    for k, v in ratios.items():
        print(f"{k:<32} {v:.3f}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
