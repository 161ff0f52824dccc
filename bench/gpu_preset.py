"""A GPU preset at its real model shape, through the real pipeline (issue 9's GPU run).

The lent GPU machines cannot download weights or data, so this runs a preset on a model of its architecture with
random weights (Llama-3.1-8B: 4096 wide, 32 layers, grouped-query attention 32/8, 14,336 MLP, 128,256-token
vocabulary) and on synthetic preference text of realistic lengths. Random weights do not change the work per step.

- ``--preset kldpo``: ``jobs/configs/kldpo_llama8b_lora.yaml`` as it is (KLDPO over DPO, LoRA r=16 on every linear
  layer, bf16 autocast, cosine schedule, clipping) on pairs, through the validate stage, the reference stage on a
  GPU actor, and the train stage on Ray Train with NCCL.
- ``--preset dora``: ``jobs/configs/dora_dpo_llama8b.yaml`` in the DoRA paper's own LoRA setting (the preset's
  comment: ``train.strategy=ddp train.lora_r=8 train.lora_alpha=16 train.lr=1e-5``; the full-parameter FSDP
  setting needs 16 GPUs) on K = 4 responses per prompt from ``golden`` and three synthetic sources, each source
  with a textual artefact (longer, repetitive, or a skewed vocabulary) for its classifier to find. Adds the
  classify stage: one golden-vs-source classifier per source on a random BERT-base (the paper's backbone shape),
  trained, calibrated and scored on the GPU.

Both run ``--steps`` optimizer steps on one GPU worker.

Recorded (``bench/results/gpu_preset.json``):
- train: pairs/s and tokens/s of the steady-state steps (the first 10% left out), from ``train/metrics.jsonl``;
- model FLOPs utilisation against a dense bf16 matmul measured in the same run. LoRA trains no base weight, so the
  backward computes input gradients only: 4 x the matmul parameters per token (not the 6 x of full training), plus
  attention's 12 x layers x width x sequence length. The 6 x figure is given beside it for comparison;
- each stage's wall time, and the GPU's peak memory (nvidia-smi, polled each second).

    python -m bench.gpu_preset --out bench/results                  # CUDA, >= 40 GB; about 6 minutes on an H200
    python -m bench.gpu_preset --preset dora --out bench/results    # DoRA LoRA preset, + classify: ~9 min on an H200
    python -m bench.gpu_preset --shape tiny --device cpu --steps 4  # the same path on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from bench.common import (
    SHAPES,
    GpuMemory,
    build_random_model,
    dense_matmul_flops,
    flops_per_token,
    matmul_rate,
    pseudo_words,
    record,
    synthetic_pairs,
)

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "kldpo": (ROOT / "jobs" / "configs" / "kldpo_llama8b_lora.yaml", []),
    # DoRA's paper trains LoRA r=8 adapters at 1e-5 (the preset's own comment gives these overrides).
    "dora": (ROOT / "jobs" / "configs" / "dora_dpo_llama8b.yaml",
             ["train.strategy=ddp", "train.lora_r=8", "train.lora_alpha=16", "train.lr=1e-5"]),
}  # fmt: skip
# The classifiers' backbone for --preset dora: BERT-base's shape (the paper's bert-base-uncased), random weights.
ENCODERS = {
    "llama3-8b": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4),
}
SOURCES = ("golden", "verbose", "repetitive", "skewed")


def synthetic_listwise(rows: int, prompt_words: int, response_words: int, seed: int = 0) -> list[dict[str, Any]]:
    """Canonical rows (prompt, responses[4], scores[4], sources[4]): one response from each of ``SOURCES``, in a
    random order, golden scored highest on average. Each synthetic source leaves an artefact its classifier can
    learn: ``verbose`` is 1.5 x longer, ``repetitive`` repeats its words, ``skewed`` draws from a tenth of the
    vocabulary."""
    rng = np.random.default_rng(seed)
    words = pseudo_words(rng)

    def text(n: int, vocab: list[str] = words) -> str:
        return " ".join(rng.choice(vocab, size=max(1, int(n * rng.uniform(0.75, 1.25)))))

    def response(source: str) -> str:
        if source == "verbose":
            return text(int(response_words * 1.5))
        if source == "repetitive":
            return " ".join(w for w in text(response_words // 2).split() for _ in range(2))
        return text(response_words, words[:300] if source == "skewed" else words)

    out = []
    for i in range(rows):
        order = rng.permutation(len(SOURCES))
        sources = [SOURCES[j] for j in order]
        scores = [float(rng.normal(1.0 if s == "golden" else 0.0)) for s in sources]
        out.append({"id": f"p{i}", "prompt": text(prompt_words), "responses": [response(s) for s in sources],
                    "scores": scores, "sources": sources})  # fmt: skip
    return out


def build_random_encoder(shape: str, texts: list[str], out: Path) -> int:
    """A random ``BertForSequenceClassification`` of ``ENCODERS[shape]`` with an encoder BPE trained on ``texts``,
    saved as a local model folder (the classify stage's ``classifier.backbone``). Returns the parameter count."""
    from transformers import BertConfig, BertForSequenceClassification

    from raydora.models import save_pretrained, train_tokenizer

    tok = train_tokenizer(iter(texts), vocab_size=8192, kind="encoder")
    cfg = BertConfig(**ENCODERS[shape], vocab_size=len(tok), max_position_embeddings=512, num_labels=2,
                     pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    save_pretrained(model, tok, out)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="kldpo", choices=sorted(PRESETS))
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--steps", type=int, default=150, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="rows per optimizer step (presets: kldpo 128, dora 32)")
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward")
    p.add_argument("--prompt-words", type=int, default=150)
    p.add_argument("--response-words", type=int, default=250)
    p.add_argument("--attn", default=None, help="a model.attn_implementation override, e.g. flex_attention")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another config override, e.g. model.pad_to_multiple_of=64 (repeatable)")  # fmt: skip
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--timeout", type=int, default=420, help="seconds for the whole script (the pipeline gets the rest)")
    p.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--out", default="bench/results")
    p.add_argument("--summarize", default=None, metavar="DIR",
                   help="only summarise a killed run, from the files gpu_check.sh brought back to DIR")  # fmt: skip
    args = p.parse_args()
    script_start = time.perf_counter()
    if args.summarize:
        summarize_returned(Path(args.summarize), args.out)
        return
    from raydora.config import load_config
    from raydora.models import train_tokenizer

    gpu = args.device == "cuda"
    if gpu:
        assert torch.cuda.is_available(), "gpu_preset.py needs a CUDA GPU (or --device cpu --shape tiny)"
        peak, name = matmul_rate(), torch.cuda.get_device_name()
    else:
        peak, name = dense_matmul_flops(torch.get_num_threads()), "cpu"
    print(f"{name}: dense {'bf16' if gpu else 'fp32'} matmul {peak / 1e12:.1f} TFLOP/s", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-preset-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    tic = time.perf_counter()
    rows = args.steps * args.batch
    preset_path, preset_overrides = PRESETS[args.preset]
    if args.preset == "dora":
        data = synthetic_listwise(rows, args.prompt_words, args.response_words)
        texts = [t for r in data[:1000] for t in (r["prompt"], *r["responses"])]
    else:
        data = synthetic_pairs(rows, args.prompt_words, args.response_words)
        texts = [t for r in data[:2000] for t in r.values()]
    pq.write_table(pa.Table.from_pylist(data), work / "prefs.parquet")
    tok = train_tokenizer(iter(texts), work / "tokenizer", vocab_size=min(8192, SHAPES[args.shape]["vocab_size"]))
    # Tokens per trained sequence (prompt + response): a pair is chosen and rejected; DoRA's DPO trains the best-
    # and worst-scored of the K responses, which are any two of them, so all K are averaged.
    lengths = [
        len(tok(r["prompt"]).input_ids) + len(tok(x).input_ids)
        for r in data[:500]
        for x in ([r["chosen"], r["rejected"]] if "chosen" in r else r["responses"])
    ]
    seq = float(np.mean(lengths))
    times["data_and_tokenizer"] = time.perf_counter() - tic
    print(f"{rows} rows ({args.preset}), {seq:.0f} tokens per sequence on average", flush=True)

    tic = time.perf_counter()
    params = build_random_model(args.shape, tok, work / "model", args.device)
    times["build_and_save_model"] = time.perf_counter() - tic
    print(f"random {args.shape}: {params / 1e9:.3f}B parameters, saved in {times['build_and_save_model']:.0f} s",
          flush=True)  # fmt: skip

    stages = ["validate", "reference", "train"]
    overrides = [
        *preset_overrides, f"root={work / 'runs'}", "name=preset", f"model.policy={work / 'model'}",
        f"data.input={work / 'prefs.parquet'}", f"ray.num_cpus={args.cpus}",
        "train.num_workers=1", "reference.actors=1", f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
        f"train.checkpoint_every={args.steps}", "train.log_every=10",
    ]  # fmt: skip
    if args.preset == "dora":
        tic = time.perf_counter()
        encoder = build_random_encoder(args.shape, texts, work / "encoder")
        times["build_and_save_encoder"] = time.perf_counter() - tic
        print(f"random classifier backbone: {encoder / 1e6:.1f}M parameters", flush=True)
        stages.insert(1, "classify")
        overrides += [f"classifier.backbone={work / 'encoder'}", "classifier.num_workers=1", "classifier.concurrency=1",
                      "classifier.score_actors=1", "classifier.epochs=1", "data.format=canonical"]  # fmt: skip
    if args.attn:
        overrides.append(f"model.attn_implementation={args.attn}")
    overrides += args.set
    if not gpu:
        overrides += ["model.precision=fp32", "train.use_gpu=false", "reference.device=cpu", "model.max_length=512",
                      "classifier.device=cpu"]  # fmt: skip
    cmd = [sys.executable, "-m", "raydora.cli", "pipeline", "--config", str(preset_path), "--stages",
           ",".join(stages), *overrides]  # fmt: skip
    lora = load_config(str(preset_path), overrides).train.lora_r > 0  # LoRA: no weight gradients for the base
    # What the summary needs besides the run folder, written before the pipeline starts: a run killed from outside
    # (the device tool's limit) can still be summarised from the files it leaves (--summarize).
    meta = {
        "device": name, "torch": torch.__version__, "shape": args.shape, "parameters": params, "lora": lora,
        "preset": str(preset_path.relative_to(ROOT)), "preset_name": args.preset, "overrides": overrides,
        "batch_pairs": args.batch, "micro_batch_pairs": args.micro_batch, "mean_sequence_tokens": seq,
        "dense_matmul_flops": peak, "seconds": times, "gpu": gpu,
    }  # fmt: skip
    (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # --timeout is the whole script's: the pipeline gets what is left of it, less a margin for the summary.
    budget = max(30.0, args.timeout - (time.perf_counter() - script_start) - 15)
    print("$ " + " ".join(cmd[1:]), flush=True)
    print(f"pipeline time limit {budget:.0f} s", flush=True)
    tic = time.perf_counter()
    log_path, timed_out = work / "pipeline.log", False
    # The log is written as the pipeline runs, so a run cut short by --timeout still leaves it (and its metrics).
    with GpuMemory(work / "gpu_peak_mib") as mem, log_path.open("w") as log_fh:
        env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
        try:
            rc = subprocess.run(cmd, cwd=ROOT, text=True, stdout=log_fh, stderr=subprocess.STDOUT,
                                timeout=budget, env=env).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc, timed_out = None, True
    times["pipeline"] = time.perf_counter() - tic
    log = log_path.read_text()
    if rc != 0:
        print(log[-6000:], flush=True)
        if not timed_out:
            raise SystemExit(f"pipeline failed (rc={rc}); log: {log_path}")
        print(f"pipeline timed out after {budget:.0f} s: reporting the steps it finished", flush=True)
    run_dir = work / "runs" / "preset"
    result = summarize(meta, log, run_dir / "train" / "metrics.jsonl", run_dir / "classifier" / "_SUCCESS",
                       mem.peak or None, timed_out)  # fmt: skip
    result["final_saved"] = (run_dir / "train" / "final").is_dir()
    print(f"written to {record(result_tag(meta), result, args.out)}", flush=True)


def result_tag(meta: dict[str, Any]) -> str:
    """The result file's name: ``gpu_preset``, ``_dora`` for that preset, ``_dryrun_cpu`` off the GPU."""
    return "gpu_preset" + ("_dora" if meta["preset_name"] == "dora" else "") + ("" if meta["gpu"] else "_dryrun_cpu")


def summarize(meta: dict[str, Any], log: str, metrics_file: Path, classifier_marker: Path,
              gpu_peak_mib: int | None, timed_out: bool) -> dict[str, Any]:  # fmt: skip
    """The summary of a run: ``meta`` (written before the pipeline), the pipeline's log, the train stage's
    ``metrics.jsonl`` and the classify stage's ``_SUCCESS`` marker (where it ran)."""
    stage_lines = [x for x in log.splitlines() if x.startswith("[") and " s)" in x]
    print("\n".join(stage_lines), flush=True)
    metrics = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
    steady = metrics[max(1, len(metrics) // 10) :]
    batch, shape, seq = meta["batch_pairs"], meta["shape"], meta["mean_sequence_tokens"]
    peak = meta["dense_matmul_flops"]
    step_s = statistics.median(batch / m["pairs_per_s"] for m in steady)
    # Every step, warm-up included, and the median of each fifth of the run: how long the warm-up lasts (new
    # sequence widths keep arriving early on; model.pad_to_multiple_of bounds them).
    steps_s = [batch / m["pairs_per_s"] for m in metrics]
    fifths = [steps_s[i * len(steps_s) // 5 : (i + 1) * len(steps_s) // 5] for i in range(5)]
    tokens_per_s = statistics.median(m["tokens_per_s"] for m in steady)
    achieved = tokens_per_s * flops_per_token(shape, seq, meta["lora"])
    result = {
        **{k: v for k, v in meta.items() if k not in ("seconds", "gpu", "lora", "preset_name")},
        "steps": len(metrics), "pairs_per_s": batch / step_s, "tokens_per_s": tokens_per_s, "step_s": step_s,
        "step_s_mean_all": statistics.mean(steps_s),
        "step_s_median_by_fifth": [statistics.median(f) if f else None for f in fifths],
        "achieved_model_flops": achieved, "mfu_vs_dense_matmul": achieved / peak,
        "mfu_6n_convention": tokens_per_s * flops_per_token(shape, seq, False) / peak,
        "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
        "gpu_peak_mib": gpu_peak_mib, "seconds": meta["seconds"], "timed_out": timed_out, "stages": stage_lines,
    }  # fmt: skip
    if classifier_marker.is_file():  # the classifiers' held-out quality: did they find the sources' artefacts?
        result["classifiers"] = json.loads(classifier_marker.read_text()).get("classifiers")
    for k in ("pairs_per_s", "tokens_per_s", "step_s", "step_s_mean_all", "step_s_median_by_fifth",
              "mfu_vs_dense_matmul", "mfu_6n_convention", "gpu_peak_mib"):  # fmt: skip
        print(f"{k:<22} {result[k]}", flush=True)
    return result


def summarize_returned(folder: Path, out: str) -> None:
    """``--summarize``: the summary of a run killed from outside, from the files ``gpu_check.sh`` brings back
    (``preset_meta.json``, ``preset_pipeline.log``, ``preset_metrics.jsonl``, ``preset_gpu_peak_mib``,
    ``preset_classifier_SUCCESS.json``)."""
    meta = json.loads((folder / "preset_meta.json").read_text())
    peak_file = folder / "preset_gpu_peak_mib"
    peak = int(peak_file.read_text()) if peak_file.is_file() else None
    result = summarize(meta, (folder / "preset_pipeline.log").read_text(), folder / "preset_metrics.jsonl",
                       folder / "preset_classifier_SUCCESS.json", peak, timed_out=True)  # fmt: skip
    result["final_saved"] = None  # not known from the returned files
    result["summarized_from"] = str(folder)
    print(f"written to {record(result_tag(meta), result, out)}", flush=True)


if __name__ == "__main__":
    main()
