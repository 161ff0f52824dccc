"""Generation throughput (generated tokens per second), as ratios measured in one run on one machine.

Engine level, in this process, on the same batches of the same prompts, model already loaded:
- ``loop``: a bare batched ``model.generate`` loop (left-padded batches, torch's threads): the baseline;
- ``hf_engine``: raydora's hf backend (``HFGenerator``) called on the same batches;
- ``vllm_engine``: raydora's vllm backend (``VLLMGenerator``, one engine), where vLLM is installed.

End to end, the whole ``generate.generate`` call through Ray Data (read, actor start-up, model load or engine
start, generation, parquet write): ``hf_ray_1actor`` (one actor with every core), ``hf_ray_2actor`` (one actor per
core), ``vllm_ray_1actor``. Start-up is a fixed cost, so these ratios grow with the number of prompts.

Targets (issue 7): hf >= 0.9x the loop; vllm >= 1.15x hf on CPU, >= 5x on a GPU.

The model is a preset built from its config (random weights: they do not change the cost) with the benchmark's
tokenizer; every backend decodes greedily, at most ``--new-tokens`` per sample, for the same prompts, and counts
the tokens it generated up to EOS. Rounds alternate the configurations (this machine's timing noise is about
15%), and each configuration's best round counts.

    .venv/bin/python -m bench.generate_speed --prompts 512 --new-tokens 32
    .venv-vllm/bin/python -m bench.generate_speed --prompts 512   # with vLLM's CPU build (make test-vllm)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import record


def prepare(root: Path, preset: str) -> Path:
    """A model folder: ``preset`` with the benchmark's BPE."""
    from raydora import synth
    from raydora.models import build_model, save_pretrained, train_tokenizer

    rows = synth.generate_rows(0, 2000, k=4, shares={"golden": 0.25, "verbose": 0.375, "sloppy": 0.375},
                               label_noise=0.0, seed=0)  # fmt: skip
    tok = train_tokenizer((x for r in rows for x in (r["prompt"], *r["responses"])), root / "tok", vocab_size=512)
    return save_pretrained(build_model(preset, tok, seed=0), tok, root / "model")


def prompts(n: int) -> list[str]:
    from raydora import synth

    rng = random.Random(0)
    return [synth.make_prompt(rng) for _ in range(n)]


def bare_loop(
    model_dir: Path, texts: list[str], new_tokens: int, batch: int, device: str = "cpu", precision: str = "fp32"
) -> tuple[int, float]:
    import torch

    from raydora.encoding import render_prompt
    from raydora.hardware import resolve_precision
    from raydora.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = load_causal_lm(model_dir, dtype=resolve_precision(precision, device)).to(device).eval()
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tok([render_prompt(tok, t) for t in texts[i : i + batch]], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)  # fmt: skip
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():  # up to and including the first EOS
                tokens += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return tokens, time.perf_counter() - start


class Engine:
    """Times raydora's generator class on the same batches as the loop. The generator is built at the first call
    (untimed); ``close`` stops it, so a vLLM engine's polling workers never overlap another configuration's run."""

    def __init__(self, model_dir: Path, texts: list[str], new_tokens: int, batch: int, backend: str,
                 eager: bool = True, device: str = "cpu", precision: str = "fp32",
                 gpu_memory: float | None = None) -> None:  # fmt: skip
        import pyarrow as pa

        self.args = (str(model_dir), new_tokens, backend, eager, device, precision)
        self.gpu_memory = gpu_memory  # vLLM's gpu_memory_utilization (None: the generator's default)
        self.texts, self.batch, self.g = texts, batch, None
        self.table = pa.table({"id": [f"p{i}" for i in range(len(texts))], "prompt": texts})

    def build(self) -> Any:
        from raydora import generate as gen

        model_dir, new_tokens, backend, eager, device, precision = self.args
        sampling = {"temperature": 0.0, "max_new_tokens": new_tokens, "n": 1, "seed": 0}
        if backend == "hf":
            return gen.HFGenerator(model_dir, sampling, max_length=256, batch_size=self.batch, device=device,
                                   precision=precision)  # fmt: skip
        extra = {} if self.gpu_memory is None else {"gpu_memory_utilization": self.gpu_memory}
        if device == "cuda":  # what the other engines freed goes back to the GPU before vLLM sizes its KV cache
            import torch

            gc.collect()
            torch.cuda.empty_cache()
        return gen.VLLMGenerator(model_dir, sampling, max_length=256, device=device, precision=precision,
                                 enforce_eager=eager, **extra)  # fmt: skip

    def __call__(self) -> tuple[int, float]:
        if self.g is None:
            self.g = self.build()
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(self.texts), self.batch):
            out = self.g(self.table.slice(i, self.batch))
            tokens += sum(sum(t) for t in out.column("generation_tokens").to_pylist())
        return tokens, time.perf_counter() - start

    def close(self) -> None:
        if self.g is not None and hasattr(self.g, "close"):
            self.g.close()
        self.g = None
        gc.collect()


def raydora_backend(
    model_dir: Path, texts: list[str], new_tokens: int, batch: int, backend: str, actors: int, out: Path
) -> tuple[int, float]:
    import pyarrow as pa

    from raydora import generate as gen
    from raydora.config import load_config

    cpus = os.cpu_count() or 2
    per_actor = (cpus - 0.25) / actors  # leave a quarter CPU for the read and write tasks
    overrides = [f"generate.backend={backend}", f"generate.actors={actors}", f"generate.batch_size={batch}",
                 f"generate.vllm_batch_size={batch}",
                 f"generate.actor_cpus={per_actor}", f"generate.threads={max(1, cpus // actors)}",
                 "generate.device=cpu"]  # fmt: skip
    cfg = load_config(None, overrides).generate
    table = pa.table({"id": [f"p{i}" for i in range(len(texts))], "prompt": texts})
    sampling = gen.Sampling(temperature=0.0, max_new_tokens=new_tokens, n=1, seed=0)
    start = time.perf_counter()
    info = gen.generate(model_dir, table, out, cfg, sampling, max_length=256, precision="fp32", fp="bench")
    return int(info["tokens"]), time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small-gpt2", help="model preset (small-gpt2: 6.6M parameters)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="prompts per generate call / Ray Data batch")
    ap.add_argument("--vllm-batch", type=int, default=0, help="prompts per vLLM call (0: --batch)")
    ap.add_argument("--vllm-compiled", action="store_true", help="also time the vLLM engine with torch.compile")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backends", default="loop,hf,vllm", help="subset of loop,hf,vllm (vllm when installed)")
    ap.add_argument("--engine-only", action="store_true", help="leave out the end-to-end runs through Ray Data")
    ap.add_argument("--tag", default="", help="suffix of the result file's name")
    args = ap.parse_args()
    import ray
    import torch

    from raydora.models import count_parameters, load_causal_lm

    backends = [b for b in args.backends.split(",") if b != "vllm" or importlib.util.find_spec("vllm") is not None]
    cpus = os.cpu_count() or 2
    torch.set_num_threads(cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = prepare(root, args.preset)
        parameters = count_parameters(load_causal_lm(model))
        texts = prompts(args.prompts)
        configs = []

        def ray_run(backend: str, actors: int) -> Any:
            size = args.vllm_batch or args.batch if backend == "vllm" else args.batch
            return lambda: raydora_backend(model, texts, args.new_tokens, size, backend, actors,
                                           root / f"out-{time.time_ns()}")  # fmt: skip

        for b in backends:
            if b == "loop":
                configs.append(("loop", lambda: bare_loop(model, texts, args.new_tokens, args.batch)))
            elif b in ("hf", "vllm"):
                size = args.vllm_batch or args.batch if b == "vllm" else args.batch
                configs.append((f"{b}_engine", Engine(model, texts, args.new_tokens, size, b)))
                if b == "vllm" and args.vllm_compiled:
                    configs.append(("vllm_engine_compiled", Engine(model, texts, args.new_tokens, size, b, False)))
                for actors in () if args.engine_only else (1, cpus) if b == "hf" else (1,):
                    configs.append((f"{b}_ray_{actors}actor", ray_run(b, actors)))
        for r in range(args.rounds):
            for name, fn in configs:
                tokens, seconds = fn()
                if name.startswith("vllm") and isinstance(fn, Engine):
                    fn.close()  # built again next round: its idle workers would slow the next configuration
                runs.setdefault(name, []).append(
                    {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}
                )
                print(f"round {r} {name:<12} {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:8.1f} tokens/s",
                      flush=True)  # fmt: skip
    ray.shutdown()
    best = {k: max(x["tokens_per_s"] for x in v) for k, v in runs.items()}
    hf_ray = max((v for k, v in best.items() if k.startswith("hf_ray")), default=None)
    ratios = {}
    if "loop" in best and "hf_engine" in best:
        ratios["hf_engine_vs_loop"] = best["hf_engine"] / best["loop"]
    if "loop" in best and hf_ray is not None:
        ratios["hf_ray_vs_loop"] = hf_ray / best["loop"]
    if "vllm_engine" in best and "hf_engine" in best:
        ratios["vllm_engine_vs_hf_engine"] = best["vllm_engine"] / best["hf_engine"]
    if "vllm_engine_compiled" in best and "hf_engine" in best:
        ratios["vllm_engine_compiled_vs_hf_engine"] = best["vllm_engine_compiled"] / best["hf_engine"]
    if "vllm_ray_1actor" in best and hf_ray is not None:
        ratios["vllm_ray_vs_hf_ray"] = best["vllm_ray_1actor"] / hf_ray
    result = {"preset": args.preset, "parameters": parameters, "prompts": args.prompts, "new_tokens": args.new_tokens,
              "batch": args.batch, "vllm_batch": args.vllm_batch or args.batch, "torch": torch.__version__,
              "best_tokens_per_s": best, "ratios": ratios, "runs": runs}  # fmt: skip
    name = (
        "generate_speed"
        + ("_vllm" if "vllm_engine" in best else "")
        + (f"_batch{args.vllm_batch}" if args.vllm_batch else "")
        + (f"_{args.tag}" if args.tag else "")
    )
    print(f"best tokens/s: {best}\nratios: {ratios}\nwritten: {record(name, result)}")


if __name__ == "__main__":
    main()
