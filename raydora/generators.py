"""Long-lived generators: a pool of Ray actors that each hold a policy and take new weights without a restart.

The ``generate`` stage starts a fresh Ray Data actor pool per call: every actor imports torch and transformers and
loads the model from disk (a vLLM engine starts from scratch). The online loop samples the same architecture
every round with new weights, so :class:`GeneratorPool` keeps ``generate.actors`` actors alive for the whole loop
and **syncs** each round's trained policy into them:

- :func:`put_folder` / :func:`put_state` put the weights **once** in the Ray object store, as safetensors blobs
  (``bytes``: no pickled tensors, nothing to unpickle): a model folder's ``*.safetensors`` files as they are on
  disk, or an in-memory state dict (a trainer's, a LoRA merge's: :func:`raydora.checkpoint.merged_lora`) encoded
  with ``safetensors.torch.save``. LoRA runs save the merged weights in ``train/final``, so the merge travels.
- :meth:`GeneratorPool.sync` hands every actor the same ``ObjectRef`` (inside a list, so Ray does not resolve it
  in the call: each actor fetches the one object itself) with a **version**. The hf backend copies the tensors
  into its model (``load_state_dict``, tied weights checked); the vLLM backend goes through vLLM's public
  worker-extension path: ``LLM(worker_extension_cls=...)`` and ``LLM.collective_rpc`` call
  :meth:`VLLMWeightSync.raydora_load_safetensors` in every engine worker, which feeds the tensors to the model's
  own ``load_weights``; the prefix cache is reset after.
- :meth:`GeneratorPool.sample` passes the pool's version with every batch, and an actor whose version differs (it
  missed a sync) refuses with :class:`StaleWeightsError`, naming both versions.

Sampling is :mod:`raydora.generate`'s: the same generator classes, the same prompt tokens, the same per-row seeds
(:func:`raydora.generate.sample_seed`), and the same cut of the prompts into batches of ``generate.batch_size``
rows (``vllm_batch_size`` for vLLM), so samples do not depend on the actor a batch lands on, and
:meth:`GeneratorPool.generate` writes the folder (and ``_SUCCESS`` marker) that :func:`raydora.generate.generate`
would. Weights reach the actors through the object store only (CPU, the default); a GPU collective broadcast
from the trainers' rank 0 is not wired yet (docs/generation.md).

**Resources.** The pool's actors reserve ``reserve_cpus`` each (default 0: the loop runs its stages one after the
other, so the idle generators leave the CPUs to training) and are spread over the nodes; on CUDA each holds its
GPUs (``tensor_parallel_size`` for vLLM) for its lifetime.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydora.generate import HFGenerator, Sampling, VLLMGenerator, resolve_backend, truncated_prompts
from raydora.rundir import promote, staging, write_success

WORKER_EXTENSION = "raydora.generators.VLLMWeightSync"


class StaleWeightsError(RuntimeError):
    """A generator asked to sample with weights it does not hold (it missed a sync)."""


@dataclass(frozen=True)
class Weights:
    """A policy's weights in the Ray object store: ``ref`` holds a list of safetensors blobs (``bytes``)."""

    ref: Any
    nbytes: int
    source: str


def folder_blobs(model_dir: str | Path) -> list[bytes]:
    """The ``*.safetensors`` files of a model folder, as bytes (sorted by name: one file, or a sharded model's)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights to sync")
    return [f.read_bytes() for f in files]


def state_blob(state: dict[str, Any]) -> bytes:
    """An in-memory state dict as one safetensors blob (CPU, contiguous). Tied tensors (the same storage under two
    names, e.g. GPT-2's LM head and token embeddings) travel once, under the first name; the receiving model
    shares them again."""
    from safetensors.torch import save

    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.to("cpu").contiguous()
    return save(out)


def _put(blobs: list[bytes], source: str) -> Weights:
    import ray

    return Weights(ray.put(blobs), sum(len(b) for b in blobs), source)


def put_folder(model_dir: str | Path) -> Weights:
    """A model folder's weights, put once in the object store."""
    return _put(folder_blobs(model_dir), str(Path(model_dir).absolute()))


def put_state(state: dict[str, Any], source: str = "state") -> Weights:
    """An in-memory state dict (a trainer's, a LoRA merge), put once in the object store."""
    return _put([state_blob(state)], source)


def load_blobs(model: Any, blobs: list[bytes]) -> int:
    """Copy safetensors ``blobs`` into ``model``'s parameters and buffers; returns the tensors loaded. Every name
    must be the model's, and every parameter the blobs leave out must share its storage with one they hold (a
    tied weight); shapes must match (``load_state_dict`` checks them; dtypes are cast as a fresh load casts)."""
    import torch
    from safetensors.torch import load

    state: dict[str, Any] = {}
    for blob in blobs:
        state.update(load(blob))
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise KeyError(f"synced weights hold names this model does not have: {unexpected[:5]}")
    loaded = {own[k].data_ptr() for k in state}
    untied = [k for k in own if k not in state and own[k].data_ptr() not in loaded]
    if untied:
        raise KeyError(f"synced weights leave out {len(untied)} of the model's tensors, e.g. {untied[:5]}")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)
    return len(state)


class VLLMWeightSync:
    """A vLLM worker extension (``LLM(worker_extension_cls=WORKER_EXTENSION)``): vLLM mixes it into each engine
    worker, where ``LLM.collective_rpc`` calls its methods. Loads through the worker's own ``reload_weights``
    (vLLM >= 0.11: the model's ``load_weights`` between vLLM's layerwise reload hooks, so that the kernels' own
    weight layouts are rebuilt: the CPU build packs its linear layers' weights after loading), else the model's
    ``load_weights`` (the path vLLM's checkpoint loader takes, name mapping and fused layers included)."""

    model_runner: Any  # the vLLM worker's, once mixed in

    def raydora_load_safetensors(self, blobs: list[bytes]) -> int:
        from safetensors.torch import load

        state: dict[str, Any] = {}
        for blob in blobs:
            state.update(load(blob))
        model = self.model_runner.model
        reload = getattr(self, "reload_weights", None)
        if reload is not None:
            reload(weights_iterator=list(state.items()), is_checkpoint_format=True)
            from vllm.platforms import current_platform

            if current_platform.is_cpu():
                _reprocess_tied(model)
        else:
            model.load_weights(weights=list(state.items()))
        return len(state)


def _reprocess_tied(model: Any) -> int:
    """Run ``process_weights_after_loading`` again on every layer whose weight another layer shares (a tied LM
    head): a reload loads the tensor once, under the embedding's name, and leaves the other layer unprocessed. On
    vLLM's CPU build that layer's matmul reads a packed copy of the weight made at load time (vLLM 0.32: the LM
    head kept sampling from the old weights), so it is packed again from the shared, now updated, tensor. Called on
    CPU only: on CUDA an unquantized tied head reads the shared tensor itself, and a quantized one must not be
    processed twice. Returns the layers processed."""
    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        weight = module.__dict__.get("_parameters", {}).get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
    n = 0
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
                n += 1
    return n


class GeneratorActor:
    """One long-lived generator (a Ray actor): an :class:`~raydora.generate.HFGenerator` or
    :class:`~raydora.generate.VLLMGenerator` and the version of the weights it holds."""

    def __init__(self, backend: str, kwargs: dict[str, Any], version: int) -> None:
        if backend == "vllm":
            self.gen: Any = VLLMGenerator(**kwargs, worker_extension_cls=WORKER_EXTENSION)
        else:
            self.gen = HFGenerator(**kwargs)
        self.backend, self.max_length, self.version = backend, int(kwargs["max_length"]), version
        self.rows = int(kwargs.get("batch_size", 1))  # hf: prompts per model.generate call (x n sequences)

    def sync(self, refs: list[Any], version: int) -> dict[str, Any]:
        """Load the weights of ``refs[0]`` (an ``ObjectRef`` of safetensors blobs) and hold ``version``."""
        import ray

        start = time.perf_counter()
        blobs = ray.get(refs[0])
        self.version = -1  # a failed load leaves no usable version
        if self.backend == "vllm":
            counts = self.gen.llm.collective_rpc("raydora_load_safetensors", args=(blobs,))
            self.gen.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
            tensors = int(counts[0])
        else:
            tensors = load_blobs(self.gen.model, blobs)
        self.version = version
        return {"version": version, "ref": refs[0].hex(), "tensors": tensors, "seconds": time.perf_counter() - start}

    def sample(self, batch: pa.Table, sampling: dict[str, Any], version: int) -> pa.Table:
        """The batch plus its samples (the generator's output columns), if this actor holds ``version``."""
        if version != self.version:
            raise StaleWeightsError(
                f"generator holds weights version {self.version} but was asked to sample with version {version}: "
                "it missed a sync (or a sync failed); sync it before sampling"
            )
        s = Sampling(**sampling)
        self.gen.sampling = s
        self.gen.max_prompt_tokens = max(1, self.max_length - s.max_new_tokens)
        if self.backend == "hf":
            self.gen.batch_size = self.rows * s.n  # as the generate stage sizes its chunks
        result: pa.Table = self.gen(batch)
        return result

    def held_version(self) -> int:
        return self.version

    def close(self) -> None:
        if self.backend == "vllm":
            self.gen.close()


class GeneratorPool:
    """``gen.actors`` long-lived generators (``gen``: a :class:`~raydora.config.GenerateConfig`) started from
    ``model_dir`` holding weights ``version``. Use as a context manager, or :meth:`close` it."""

    def __init__(
        self,
        model_dir: str | Path,
        gen: Any,
        *,
        max_length: int,
        precision: str = "auto",
        version: int = 0,
        reserve_cpus: float = 0.0,
    ) -> None:
        import ray

        from raydora.cluster import check_gpus, resolve_device

        self.device = resolve_device(gen.device)
        self.backend = resolve_backend(gen.backend, self.device)
        self.gen, self.version, self.model = gen, version, str(Path(model_dir).absolute())
        self.max_length = max_length
        common: dict[str, Any] = {
            "model_dir": self.model,
            "sampling": asdict(Sampling()),
            "max_length": max_length,
            "device": self.device,
            "precision": precision,
        }
        if self.backend == "vllm":
            kwargs = {
                **common,
                "tensor_parallel_size": gen.tensor_parallel_size,
                "gpu_memory_utilization": gen.gpu_memory_utilization,
                "enforce_eager": gen.enforce_eager,
            }
            gpus = gen.tensor_parallel_size if self.device == "cuda" else 0
            self.batch_rows = gen.vllm_batch_size
        else:
            # The same batches of sequences as the generate stage's; threads: generate.threads, else one per whole
            # CPU of generate.actor_cpus (what Ray gives a stage actor), whatever the pool reserves.
            threads = gen.threads or max(1, int(gen.actor_cpus))
            kwargs = {**common, "batch_size": gen.batch_size, "threads": threads}
            gpus = 1 if self.device == "cuda" else 0
            self.batch_rows = gen.batch_size
        check_gpus(gen.actors, gpus, "generate.actors")
        remote = ray.remote(GeneratorActor).options(
            num_cpus=reserve_cpus, num_gpus=gpus, scheduling_strategy="SPREAD", max_concurrency=1
        )
        self.actors: list[Any] = [remote.remote(self.backend, kwargs, version) for _ in range(gen.actors)]
        ray.get([a.held_version.remote() for a in self.actors])  # started (a load error surfaces here)

    def __enter__(self) -> GeneratorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the actors (a vLLM engine's processes first)."""
        import ray

        if not self.actors:
            return
        try:
            ray.get([a.close.remote() for a in self.actors], timeout=30)
        except Exception:  # noqa: BLE001 - best effort: the actors are killed next either way
            pass
        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def sync(self, weights: Weights | str | Path, version: int) -> dict[str, Any]:
        """Push ``weights`` (a :class:`Weights` handle, or a model folder, put once here) into every actor, which
        then holds ``version``. Returns the seconds it took (the put included), the bytes and the per-actor
        reports (each names the ``ObjectRef`` it fetched)."""
        import ray

        start = time.perf_counter()
        w = weights if isinstance(weights, Weights) else put_folder(weights)
        reports = ray.get([a.sync.remote([w.ref], version) for a in self.actors])
        self.version, self.model = version, w.source
        return {
            "version": version,
            "bytes": w.nbytes,
            "seconds": time.perf_counter() - start,
            "actors": reports,
        }

    def sample(self, prompts: pa.Table, sampling: Sampling) -> pa.Table:
        """``prompts`` plus their samples, in the prompts' order: batches of the generate stage's size, each on
        the next free actor, each checked against the pool's version."""
        from ray.util import ActorPool

        n = self.batch_rows
        batches = [prompts.slice(a, n) for a in range(0, prompts.num_rows, n)]
        s, version = asdict(sampling), self.version
        pool = ActorPool(list(self.actors))
        outs = list(pool.map(lambda actor, batch: actor.sample.remote(batch, s, version), batches))
        return pa.concat_tables(outs) if outs else prompts

    def generate(
        self,
        prompts: pa.Table,
        out_dir: str | Path,
        sampling: Sampling,
        *,
        fp: str | None = None,
        stage: str = "generate",
    ) -> dict[str, Any]:
        """:func:`raydora.generate.generate` on the live actors: the samples of ``prompts`` into ``out_dir``
        (parquet, atomically, with the same ``_SUCCESS`` marker, plus the weights' version). Returns the marker."""
        out = Path(out_dir).absolute()
        start = time.perf_counter()
        table = self.sample(prompts, sampling)
        elapsed = time.perf_counter() - start
        tokens = sum(sum(t) for t in table.column("generation_tokens").to_pylist())
        max_prompt = max(1, self.max_length - sampling.max_new_tokens)
        cut = truncated_prompts(self.model, prompts, max_prompt)
        if cut:
            print(
                f"[{stage}] {cut} of {table.num_rows} prompts longer than model.max_length - "
                f"generate.max_new_tokens = {max_prompt} tokens: each keeps its end",
                flush=True,
            )
        info = {
            "stage": stage,
            "fingerprint": fp,
            "rows": {"prompts": table.num_rows, "samples": table.num_rows * sampling.n},
            "prompts_truncated": cut,
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "actors": len(self.actors),
            "sampling": asdict(sampling),
            "tokens": tokens,
            "seconds": round(elapsed, 3),
            "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
            "weights_version": self.version,
        }
        with staging(out.parent, out.name) as tmp:
            (tmp / "out").mkdir()
            pq.write_table(table, tmp / "out" / "part-000000.parquet")
            write_success(tmp / "out", info)
            promote(tmp / "out", out)
        return info
