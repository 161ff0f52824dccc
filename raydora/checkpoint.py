"""Checkpoints and final weights of a training run: save (full or LoRA adapters only), resume, merge LoRA
adapters from a gathered state, and find the newest complete checkpoint.

A checkpoint folder ends with ``manifest.json`` (its step and every file's size), written last: a folder whose
files do not match it (a copy cut short by a lost node, a truncated or deleted file) is skipped on resume, which
falls back to the previous good checkpoint and says so."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from raydora.rundir import fresh_staging

TRAINER_STATE = "trainer_model.safetensors"  # LoRA checkpoints: the trainable (adapter) parameters, training's names
MANIFEST = "manifest.json"
CKPT_STAGING = "raydora-ckpt"  # save_checkpoint's temp folders: <tmp>/.raydora-ckpt.tmp-<random>-<pid>-<host>
PREEMPTED_EXIT = 128 + signal.SIGTERM  # a process that SIGTERM ended: the status shells and Kubernetes expect


def unwrap(model: Any) -> Any:
    """The model inside a DDP wrapper (FSDP2 and plain models are their own)."""
    return getattr(model, "module", model)


def save_checkpoint(
    model: Any, optimizer: Any, scheduler: Any, tokenizer: Any, step: int, *, lora: bool, rank: int
) -> str | None:
    """Write a checkpoint folder in a fresh temp dir and return its path (rank 0; other ranks take part in the
    gather and get None): ``model/`` (HF, safetensors), or with ``lora`` the adapters only, plus ``state.pt``
    (optimizer, scheduler, step)."""
    import torch

    from raydora import distributed

    # LoRA checkpoints hold the adapters only (the frozen base is the run's model_dir): megabytes, not the
    # model's size twice over. final/ holds the merged weights.
    state = distributed.full_state_dict(model, trainable_only=lora)
    opt_state = distributed.optimizer_state(model, optimizer)
    if rank != 0:
        return None
    # In the temp dir under a name with this process's id: a write cut short by a kill is removed by the next
    # process's first checkpoint on this host (rundir.stale_staging), instead of filling the temp disk.
    out = fresh_staging(tempfile.gettempdir(), CKPT_STAGING)
    if lora:
        from safetensors.torch import save_file

        # A PEFT adapter folder, written from the gathered state (the model's own parameters may be shards).
        unwrap(model).save_pretrained(str(out / "adapter"), safe_serialization=True, state_dict=state)
        tokenizer.save_pretrained(str(out / "adapter"))
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(out / TRAINER_STATE))
    else:
        save_model(model, tokenizer, out / "model", state)
    torch.save({"step": step, "optimizer": opt_state, "scheduler": scheduler.state_dict()}, out / "state.pt")
    (out / "step.json").write_text(json.dumps({"step": step}))
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.rglob("*")) if f.is_file()}
    (out / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
    return str(out)


def verify(folder: str | Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from (a missing file, a size that differs from its
    manifest's), or None when it is whole. Folders written before manifests existed are checked for their files."""
    d = Path(folder)
    manifest = d / MANIFEST
    if not manifest.is_file():
        if not (d / "state.pt").is_file() or not ((d / "model").is_dir() or (d / TRAINER_STATE).is_file()):
            return "no manifest.json, and state.pt or the weights are missing"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, size in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


def merged_lora(peft_model: Any, state: dict[str, Any]) -> Any:
    """The plain model with the adapters merged, built on CPU from the gathered full ``state``, never from the live
    model: FSDP's sharded modules cannot be deep-copied, and a copy on the GPU would hold a second model at the end
    of a run. The frozen base keeps its dtype (bf16 under autocast); PEFT casts the delta to it. For saving only:
    non-persistent buffers (e.g. rotary ``inv_freq``) stay on the meta device."""
    import copy

    import torch
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    name = peft_model.active_adapter
    adapter = copy.deepcopy(peft_model.peft_config[name])  # PEFT edits the config it is given
    with torch.device("meta"):
        shell = get_peft_model(AutoModelForCausalLM.from_config(peft_model.get_base_model().config), adapter, name)
    # One process on CPU: the state's tensors are the live parameters, which the merge would add into.
    live = {p.data_ptr() for p in peft_model.parameters() if type(p).__name__ != "DTensor" and p.device.type == "cpu"}
    copies: dict[int, Any] = {}  # tied tensors stay one tensor
    own = {k: copies.setdefault(v.data_ptr(), v.clone()) if v.data_ptr() in live else v for k, v in state.items()}
    _, unexpected = shell.load_state_dict(own, assign=True, strict=False)  # missing: checked on meta below
    if unexpected:
        raise KeyError(f"merging the LoRA adapters: gathered state has unknown keys {unexpected[:5]}")
    # assign=True replaced tied parameters by separate ones: tie them again, so the saved model stays tied.
    shell.get_base_model().tie_weights()
    unset = [n for n, p in shell.named_parameters() if p.is_meta]
    if unset:
        raise KeyError(f"merging the LoRA adapters: no weights gathered for {unset[:5]}")
    # Merge each adapted layer on the device the adapters trained on, one layer at a time (the device holds one
    # layer more at most): a Ray worker has one CPU thread, which took about a minute for an 8B model's adapters
    # (~1 GFLOP and 117 MB of bf16 per MLP projection); a GPU merges them in seconds. The merged weights are
    # copied back into the CPU tensors they came from, so the host holds the state once, not twice. A layer the
    # device has no room for merges on CPU.
    device = next((p.device for p in peft_model.parameters() if p.requires_grad), torch.device("cpu"))
    for module in shell.modules():
        if isinstance(module, LoraLayer):
            assert isinstance(module, torch.nn.Module)  # PEFT's LoRA layers are modules (typed as a mixin)
            host = {n: p.data for n, p in module.named_parameters()}
            try:
                module.to(device).merge(adapter_names=[name])
            except torch.cuda.OutOfMemoryError:
                module.to("cpu").merge(adapter_names=[name])
            for n, p in module.named_parameters():
                if p.data_ptr() != host[n].data_ptr():  # it went to the device and came back as a new tensor
                    host[n].copy_(p.data)
                    p.data = host[n]
    return shell.unload()


def save_model(model: Any, tokenizer: Any, out: Path, state: dict[str, Any]) -> None:
    """``save_pretrained`` of the full (merged, unsharded) model."""
    from raydora.models import save_pretrained

    inner = unwrap(model)
    if hasattr(inner, "merge_and_unload"):  # LoRA: save the merged weights, which transformers and vLLM load
        save_pretrained(merged_lora(inner, state), tokenizer, out)
        return
    if any(type(p).__name__ == "DTensor" for p in inner.parameters()):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(inner.config)
        plain.load_state_dict(state, assign=True, strict=False)
        plain.tie_weights()  # assign=True replaced the tied parameters by separate copies
        save_pretrained(plain, tokenizer, out)
        return
    save_pretrained(inner, tokenizer, out)


def load_policy(
    model_dir: str | Path, amp: Any, master: Any, attn: str, lora_r: int = 0, lora_alpha: float = 16.0
) -> Any:
    """The policy to train: master weights in ``master`` (fp32), or with ``lora_r``, LoRA adapters (fp32) over a
    frozen base stored in the compute dtype ``amp`` (bf16 on GPUs: half the memory and no casts in every step, as
    PEFT and TRL users load it with dtype=bfloat16). The reference pass loads its weights the same way
    (``reference.ReferenceModel``), so the two agree at step 0."""
    import torch

    from raydora.models import load_causal_lm

    base = amp if lora_r and amp != torch.float32 else master
    model: Any = load_causal_lm(model_dir, dtype=base, attn_implementation=attn)
    model.config.use_cache = False
    if lora_r:
        from peft import LoraConfig, get_peft_model

        # PEFT annotates lora_alpha as int; it takes any scale (alpha / r).
        lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear")  # type: ignore[arg-type]
        model = get_peft_model(model, lora)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(master)
    return model


def restore(folder: str | Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Load a checkpoint folder (:func:`save_checkpoint`) into the model, optimizer and scheduler; returns its step.
    Tensors and numbers only: ``state.pt`` is read with ``weights_only`` and never unpickles code."""
    import torch
    from safetensors.torch import load_file

    from raydora import distributed

    d = Path(folder)
    raw = d / TRAINER_STATE
    state = load_file(str(raw if raw.exists() else d / "model" / "model.safetensors"))
    distributed.load_full_state_dict(unwrap(model), state, trainable_only=raw.exists())
    saved = torch.load(d / "state.pt", weights_only=True)
    distributed.load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["step"])


def _step_of(folder: Path) -> int | None:
    for name in (MANIFEST, "step.json"):
        try:
            return int(json.loads((folder / name).read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def latest_checkpoint(out_dir: Path, *, say: bool = False) -> tuple[int, Path | None]:
    """``(step, folder)`` of the newest whole checkpoint under ``out_dir/checkpoints`` (``(0, None)``: none).
    Newer folders that fail :func:`verify` are passed over; ``say`` prints each with its reason."""
    found = [(s, p) for p in (out_dir / "checkpoints").glob("*") if p.is_dir() and (s := _step_of(p)) is not None]
    for step, folder in sorted(found, key=lambda x: x[0], reverse=True):
        why = verify(folder)
        if why is None:
            return step, folder
        if say:
            print(f"[checkpoint] skipping step {step} ({folder}): {why}; trying the previous one", flush=True)
    return 0, None


def pick_resume(ray_dir: Path | None, resume_from: str | None, start: int) -> Path | None:
    """The checkpoint a starting worker restores. Ray Train's own (``ray_dir``: after a worker failure in this run,
    or the newest its snapshot kept from an earlier one) when it is whole and not older than ``start``, the step the
    driver planned the data from; else the driver's pick ``resume_from`` (:func:`latest_checkpoint`), else none."""
    if ray_dir is not None:
        why = verify(ray_dir)
        step = _step_of(ray_dir)
        if why is None and step is not None and step >= start:
            return ray_dir
        why = why or f"step {step} is older than step {start}, where the driver planned the data"
        print(f"[checkpoint] not restoring Ray Train's checkpoint {ray_dir}: {why}", flush=True)
    return Path(resume_from) if resume_from else None


def keep_local_checkpoint(folder: Path, out_dir: Path, step: int, keep: int | None) -> Path:
    """Move the checkpoint ``folder`` (:func:`save_checkpoint`'s temp dir) to ``out_dir/checkpoints/``, where Ray
    Train keeps a worker group's checkpoints, for runs in the driver process (``num_workers=0``): the move is
    the last step, so :func:`latest_checkpoint` finds the folder whole or not at all. Then only the newest ``keep``
    (None: all) stay."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"checkpoint_local_{step:08d}"
    shutil.rmtree(dest, ignore_errors=True)
    tmp = root / f".{dest.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.move(str(folder), tmp)  # another filesystem than the temp dir's: copied, then renamed in one step
    tmp.rename(dest)
    if keep is not None:
        ours = sorted(root.glob("checkpoint_local_*"), key=lambda p: _step_of(p) or 0)
        for old in ours[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return dest


def latest_step(out_dir: Path) -> int:
    """The step of the newest checkpoint under ``out_dir/checkpoints`` (0 when none)."""
    return latest_checkpoint(out_dir)[0]


class Preempted(SystemExit):
    """SIGTERM stopped training after a checkpoint of the last whole step (``train.preemption_checkpoint``): the
    process ends as asked (exit status 143, the message printed to stderr), and the same command resumes from that
    step. A ``SystemExit``, so that ``except Exception`` in callers does not swallow a request to terminate."""

    def __init__(self, message: str) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.message = message

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def preemption(enabled: bool) -> Iterator[threading.Event | None]:
    """While the training loop runs in this process: SIGTERM sets the yielded event instead of ending the process
    (the loop finishes its step, checkpoints it and stops); the previous handler (Ray's, which exits) comes back
    afterwards. Yields None when ``enabled`` is off or this is not the main thread (Python lets only the main
    thread set signal handlers: a Ray Tune trial's or a Ray Train worker's loop runs in another thread)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield None
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def drain_notice(mode: str, step: int, rank: int) -> bool:
    """Whether Ray Train reports a node of this worker group draining for preemption (``ray.train
    .get_preemption_info``, a collective: the same answer on every rank, as the checkpoint that follows needs);
    rank 0 says so."""
    import ray.train

    info = ray.train.get_preemption_info()
    if info is None:
        return False
    if rank == 0:
        left = "" if info.deadline_ms is None else f", {info.deadline_ms / 1e3 - time.time():.0f} s before its deadline"
        nodes = ", ".join(n[:12] for n in info.preempted_node_ids)
        print(
            f"[{mode}] node {nodes} (ranks {info.preempted_ranks}) is being preempted{left}: checkpointing step "
            f"{step}; Ray Train restarts the group from it when the node goes",
            flush=True,
        )
    return True
