"""The final save of a LoRA run at Llama-3.1-8B's shape on one GPU: gather the state to CPU, merge the adapters,
write safetensors, timed step by step (issue 9's GPU run found this step dominating the end of the DoRA preset).

The merge runs each adapted layer on the adapters' device (``checkpoint.merged_lora``). For the ratio, the same merge
on CPU in a Ray worker's one thread is timed on the first ``--cpu-layers`` layers in the same run and scaled to the
whole model by the adapted layers' weights (the embeddings and the LM head are never merged).

    python -m bench.gpu_merge --out bench/results          # CUDA, >= 40 GB
    python -m bench.gpu_merge --device cpu --shape tiny    # the same path on CPU
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import SHAPES, record


def lora_model(shape: dict, device: str, r: int) -> torch.nn.Module:
    """A random Llama of ``shape`` (bf16 base on CUDA) with LoRA r adapters on every linear layer, B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16 if device == "cuda" else torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_B" in name:
                p.data.normal_(std=1e-3)
    return model


def adapted_weights(model: torch.nn.Module) -> int:
    """Elements of the base weights that carry an adapter (what a merge rewrites)."""
    from peft.tuners.lora import LoraLayer

    return sum(m.base_layer.weight.numel() for m in model.modules() if isinstance(m, LoraLayer))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--cpu-layers", type=int, default=2, help="layers of the CPU merge timed for the ratio")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    from raydora import distributed
    from raydora.checkpoint import merged_lora
    from raydora.models import save_pretrained, train_tokenizer

    torch.set_num_threads(1)  # a Ray Train worker's one CPU
    shape = SHAPES[args.shape]
    tok = train_tokenizer(iter(["a b c d e f g"] * 10), vocab_size=300)
    times: dict[str, float] = {}
    tic = time.perf_counter()
    model = lora_model(shape, args.device, args.lora_r)
    times["build"] = time.perf_counter() - tic
    params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    adapted = adapted_weights(model)
    tic = time.perf_counter()
    state = distributed.full_state_dict(model)
    times["gather_state_to_cpu"] = time.perf_counter() - tic
    tic = time.perf_counter()
    merged = merged_lora(model, state)
    times["merge_on_device"] = time.perf_counter() - tic
    with tempfile.TemporaryDirectory() as d:
        tic = time.perf_counter()
        save_pretrained(merged, tok, Path(d))
        times["save_safetensors"] = time.perf_counter() - tic
    del merged, state, model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    # The same merge on CPU (the code before this change), on a slice of the layers.
    small = {**shape, "num_hidden_layers": args.cpu_layers, "vocab_size": 1024}
    cpu_model = lora_model(small, "cpu", args.lora_r)
    for p_ in cpu_model.parameters():
        if not p_.requires_grad:
            p_.data = p_.data.to(torch.bfloat16)
    cpu_adapted = adapted_weights(cpu_model)
    tic = time.perf_counter()
    cpu_model.merge_and_unload()
    cpu_s = time.perf_counter() - tic
    # Scaled by the adapted layers' weights: the embeddings and the LM head are never merged.
    times["merge_on_one_cpu_thread_scaled"] = cpu_s * adapted / cpu_adapted
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "shape": args.shape,
        "frozen_parameters": params,
        "adapted_weights": adapted,
        "cpu_merge_measured": {"layers": args.cpu_layers, "seconds": cpu_s},
        "lora_r": args.lora_r,
        "seconds": times,
        "merge_speedup_vs_one_cpu_thread": times["merge_on_one_cpu_thread_scaled"] / times["merge_on_device"],
    }
    for k, v in times.items():
        print(f"{k:<32} {v:8.2f} s", flush=True)
    print(f"merge on {args.device} vs one CPU thread: {result['merge_speedup_vs_one_cpu_thread']:.1f}x", flush=True)
    print(f"written to {record('gpu_merge' + ('' if args.device == 'cuda' else '_dryrun_cpu'), result, args.out)}")


if __name__ == "__main__":
    main()
