"""DoRA stage 1: one probabilistic classifier per synthetic source, golden (1) vs that source (0), trained on Ray
Train and calibrated on held-out data by temperature scaling (``classifier.calibration: platt`` adds a bias). By
default one Ray Train run trains them one after another (the workers start once); ``classifier.concurrency``
splits the sources into that many runs at once, each with ``classifier.num_workers`` workers
(``classifier.num_workers=0``: one after another in this process, without Ray Train).

**Input** is the pair ``[CLS] prompt [SEP] response [SEP]``, not the response alone: a sloppy source's artefact
is a *wrong* answer, and whether an answer is wrong depends on the prompt. The prompt is truncated first when the
pair is too long (``only_first``), so the response, where the artefacts live, is kept.

**Splits** are by prompt (a hash of the row id), so no prompt's responses leak from training into the held-out
set; the held-out set is halved again (by hash) into a calibration half, where the temperature is fit, and an
evaluation half, where ``metrics.json`` is measured before and after calibration.

Output per source: ``classifier/<source>/`` holds a HF model folder (safetensors), ``calibration.json``
(temperature, bias (0 unless Platt) and the imbalance ratio gamma = #source / #golden of its training set),
``metrics.json`` and ``holdout.npy`` (the held-out margins, labels and calibration flags): a rerun where only
``classifier.calibration`` changed refits the calibration from them and keeps the trained weights.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from raydora import calibration
from raydora.cluster import check_gpus, resolve_device
from raydora.data import in_this_process, ordered, ordered_ingest, read_canonical
from raydora.progress import Progress, watch
from raydora.rundir import StageResult, fingerprint, is_done, promote, read_success, staging, write_success

GOLDEN, UNKNOWN = "golden", "unknown"
HASH_BUCKETS = 10_000
TRAIN_SETTINGS = ("backbone", "epochs", "lr", "batch_size", "num_workers", "holdout_fraction", "max_length")


def _bucket(row_id: str, salt: str) -> float:
    """A stable pseudo-random number in [0, 1) per row id."""
    digest = hashlib.sha256(f"{salt}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HASH_BUCKETS / HASH_BUCKETS


def explode(
    batch: pa.Table,
    sources: list[str] | str,
    holdout_fraction: float,
    seed: int,
    targets: tuple[str, ...] | list[str] = (GOLDEN,),
) -> pa.Table:
    """Ray Data UDF: canonical rows -> the examples of every classifier in ``sources``: each ``s`` response is
    one example of classifier ``s``, each target response (``data.target_sources``, default golden) one example
    of every classifier.
    ``source`` (the classifier), ``prompt, response, label (1 golden / 0 source), holdout, calib``; filtered to
    one source, the examples keep the data's order."""
    wanted = [sources] if isinstance(sources, str) else list(sources)
    out: dict[str, list[Any]] = {k: [] for k in ("source", "prompt", "response", "label", "holdout", "calib")}
    for row in batch.select(["id", "prompt", "responses", "sources"]).to_pylist():
        held = _bucket(row["id"], f"holdout-{seed}") < holdout_fraction
        calib = _bucket(row["id"], f"calib-{seed}") < 0.5
        for response, src in zip(row["responses"], row["sources"], strict=True):
            is_target = src in targets
            for classifier in wanted if is_target else ([src] if src in wanted else []):
                out["source"].append(classifier)
                out["prompt"].append(row["prompt"])
                out["response"].append(response)
                out["label"].append(int(is_target))
                out["holdout"].append(held)
                out["calib"].append(calib)
    return pa.table(
        out,
        schema=pa.schema(
            [
                ("source", pa.string()),
                ("prompt", pa.string()),
                ("response", pa.string()),
                ("label", pa.int64()),
                ("holdout", pa.bool_()),
                ("calib", pa.bool_()),
            ]
        ),
    )


def split_counts(examples: Any) -> dict[str, tuple[int, int]]:
    """``{source: (golden, source)}`` training examples (holdout false) of an exploded dataset, in one pass over
    three small columns."""
    counts: dict[str, list[int]] = {}
    for b in examples.select_columns(["source", "holdout", "label"]).iter_batches(batch_format="numpy"):
        train = ~b["holdout"].astype(bool)
        for s in np.unique(b["source"][train]):
            labels = b["label"][train & (b["source"] == s)]
            c = counts.setdefault(str(s), [0, 0])
            c[0], c[1] = c[0] + int(labels.sum()), c[1] + int(len(labels) - labels.sum())
    return {s: (g, n) for s, (g, n) in counts.items()}


def synthetic_sources(data_dir: str | Path) -> dict[str, int]:
    """Responses per source in ``data_dir`` (all sources, golden and unknown included)."""
    counts: dict[str, int] = {}
    for batch in read_canonical(data_dir).select_columns(["sources"]).iter_batches(batch_format="pyarrow"):
        for sources in batch.column("sources").to_pylist():
            for s in sources:
                counts[s] = counts.get(s, 0) + 1
    return counts


def resolve_backbone(backbone: str) -> tuple[str, str]:
    """``("preset", name)`` or ``("path", folder)``. ``auto``: the pretrained MiniLM when its package is
    installed, else the ``tiny-bert`` preset trained from scratch."""
    from raydora.models import PRESETS, minilm_path

    if backbone == "auto":
        path = minilm_path()
        return ("path", str(path)) if path else ("preset", "tiny-bert")
    if backbone in PRESETS:
        if PRESETS[backbone].kind != "encoder":
            raise ValueError(f"classifier.backbone {backbone!r} is not an encoder preset")
        return "preset", backbone
    return "path", backbone


def fit_pair(prompt: list[int], response: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Token ids of a ``(prompt, response)`` pair cut to ``budget`` tokens together: the prompt is cut first, from
    its start (its end, the last turn, stays), down to ``budget // 2`` tokens; then the response, from its end. A
    pair that fits is returned unchanged."""
    if len(prompt) + len(response) <= budget:
        return prompt, response
    keep_response = min(len(response), max(budget - len(prompt), budget - min(len(prompt), budget // 2)))
    keep_prompt = budget - keep_response
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]


def encode(tokenizer: Any, prompts: list[str], responses: list[str], max_length: int) -> Any:
    """The classifier input: ``(prompt, response)`` pairs in ``max_length`` tokens. Pairs that fit are encoded as
    they are; longer ones are cut by :func:`fit_pair` (the prompt keeps its end, and half the budget when it needs
    it; a long response keeps its start), so neither a long prompt nor a long response fails."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
    if budget < 2:
        raise ValueError(f"classifier.max_length={max_length} leaves no room for a prompt and a response")
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    prompts, responses = list(prompts), list(responses)
    for i, (p, r) in enumerate(zip(p_ids, r_ids, strict=True)):
        if len(p) + len(r) > budget:  # decoded back to text; longest_first trims what re-encoding may add
            p, r = fit_pair(p, r, budget)
            prompts[i], responses[i] = tokenizer.decode(p), tokenizer.decode(r)
    return tokenizer(
        prompts, responses, truncation="longest_first", max_length=max_length, padding=True, return_tensors="pt"
    )


def autocast(device: Any, precision: str | None) -> Any:
    """The autocast context of ``classifier.precision`` on ``device`` (disabled where it resolves to fp32)."""
    from raydora import hardware

    return hardware.autocast(device.type, hardware.resolve_precision(precision or "fp32", device.type))


def precision_tag(precision: str | None, device: str) -> str | None:
    """What the classify and score fingerprints record of ``classifier.precision``: ``"bf16"`` where the forwards
    will autocast to bf16 on ``device`` (``cuda`` or ``cpu``), None where they run fp32, so that fp32 run folders,
    all made before the setting existed, stay valid. On CUDA a driver without a GPU (a CPU head node) cannot
    ask the hardware and takes ``auto`` for bf16, which every GPU raydora targets runs natively; on CPU this
    node's flags decide (an explicit bf16 on a CPU without it fails here, before any training)."""
    import torch

    from raydora.hardware import resolve_precision

    requested = precision or "fp32"
    if requested == "fp32":
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return "bf16"
    return "bf16" if resolve_precision(requested, device) == torch.bfloat16 else None


def margins(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    precision: str | None = "fp32",
) -> np.ndarray:
    """Logit margins ``z = logit_golden - logit_other`` (no grad), one per pair."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad(), autocast(device, precision):
        enc = encode(tokenizer, prompts, responses, max_length).to(device)
        logits = model(**enc).logits.float()
    z: np.ndarray = (logits[:, 1] - logits[:, 0]).cpu().numpy().astype(np.float64)
    return z


def _train_loop(cfg: dict[str, Any]) -> None:
    """Ray Train worker: for each source in turn, fine-tune golden-vs-source on this worker's shard (DDP), then
    rank 0 scores that source's held-out set. One run trains every source (one worker start-up, not one per
    source); each source's model starts from the same seed as a run of its own would. Rank 0 reports one
    checkpoint: a folder per source with the model and the held-out margins. With ``cfg["datasets"]``
    (``classifier.num_workers=0``) it runs in this process, calls no ``ray.train`` function and leaves that folder
    at ``cfg["out"]``."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers

    from raydora.models import build_model, load_encoder, load_tokenizer, save_pretrained

    transformers.utils.logging.disable_progress_bar()

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    tok = load_tokenizer(cfg["tokenizer"])
    kind, name = cfg["backbone"]
    local = cfg.get("datasets")  # the datasets by name, in this process
    ctx = None if local is not None else ray.train.get_context()
    world, rank = (1, 0) if ctx is None else (ctx.get_world_size(), ctx.get_world_rank())
    shard = local.__getitem__ if local is not None else ray.train.get_dataset_shard
    counter = cfg.get("progress")  # a progress.Counter actor: every rank adds the examples it trained on
    per_worker = max(1, cfg["batch_size"] // world)
    out = None  # rank 0's folder of results: the checkpoint it reports, or in this process the caller's folder
    if rank == 0:
        out = Path(cfg["out"]) if local is not None else Path(tempfile.mkdtemp(prefix="raydora-clf-"))
    metrics: dict[str, Any] = {}
    for source in cfg["sources"]:
        torch.manual_seed(cfg["seed"])
        model: Any = build_model(name, tok, num_labels=2, seed=cfg["seed"]) if kind == "preset" else load_encoder(name)
        model.train()
        model = model.to(cfg["device"]) if local is not None else ray.train.torch.prepare_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
        device = next(model.parameters()).device
        amp = autocast(device, cfg["precision"])
        loss = enc = labels = logits = None
        for epoch in range(cfg["epochs"]):
            total, n = 0.0, 0
            for batch in shard(f"train_{source}").iter_batches(
                batch_size=per_worker,
                batch_format="numpy",
                local_shuffle_buffer_size=4 * per_worker,
                local_shuffle_seed=cfg["seed"] + epoch,
            ):
                enc = encode(tok, list(batch["prompt"]), list(batch["response"]), cfg["max_length"]).to(device)
                labels = torch.as_tensor(batch["label"], device=device)
                with amp:
                    logits = model(**enc).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"classifier {source!r}: loss is {loss.item()} at epoch {epoch}: stopping")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total, n = total + loss.item() * len(labels), n + len(labels)
                if counter is not None:
                    counter.add.remote(len(labels))
            metrics[f"{source}/epoch"] = epoch
            metrics[f"{source}/train_loss"] = total / max(n, 1)
        inner = model.module if hasattr(model, "module") else model
        if out is not None:
            inner.eval()
            held: dict[str, list[Any]] = {"margin": [], "label": [], "calib": []}
            for batch in shard(f"holdout_{source}").iter_batches(batch_size=64, batch_format="numpy"):
                held["margin"].extend(
                    margins(
                        inner, tok, list(batch["prompt"]), list(batch["response"]), cfg["max_length"], cfg["precision"]
                    )
                )
                held["label"].extend(batch["label"].tolist())
                held["calib"].extend(batch["calib"].tolist())
            save_pretrained(inner, tok, out / source / "model")
            np.save(
                out / source / "holdout.npy", np.array([held["margin"], held["label"], held["calib"]], dtype=np.float64)
            )
        # Free this source's model before the next one is built: the last loss's graph holds every parameter.
        del model, inner, opt, loss, enc, labels, logits
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if local is not None:
        return
    if out is None:
        ray.train.report(metrics)
        return
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)))
    shutil.rmtree(out, ignore_errors=True)  # report() has persisted it to the run's storage


def _write_calibration(folder: Path, held: np.ndarray, method: str, info: dict[str, Any]) -> dict[str, Any]:
    """Fit ``method`` on ``held`` (``calibration.calibrate``), write ``calibration.json`` (``info`` with the fit)
    and ``metrics.json`` into ``folder``; returns the classifier's summary for the stage's marker."""
    temperature, bias, metrics = calibration.calibrate(held, method)
    info = {**info, "calibration": method, "temperature": temperature, "bias": bias}
    (folder / "calibration.json").write_text(json.dumps(info, indent=2) + "\n")
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    after, before = metrics["after"], metrics["before"]
    return {
        "gamma": info["gamma"],
        "temperature": temperature,
        "bias": bias,
        "auc": after["roc_auc"],
        "ece_before": before["ece"],
        "ece_after": after["ece"],
    }


def _recalibrate(out: Path, method: str, fp: str) -> StageResult | None:
    """Refit the calibration of the finished classifiers in ``out`` from their saved held-out margins (no
    training), when every one has them; None otherwise (folders made before ``holdout.npy`` was kept)."""
    marker = read_success(out) or {}
    sources = marker.get("sources") or []
    if not sources or not all((out / s / "holdout.npy").is_file() for s in sources):
        return None
    summary: dict[str, Any] = {}
    with staging(out.parent, out.name) as tmp:
        shutil.copytree(out, tmp / "out", ignore=shutil.ignore_patterns("_SUCCESS", ".*"))
        for s in sources:
            held = np.load(tmp / "out" / s / "holdout.npy", allow_pickle=False)
            info = json.loads((tmp / "out" / s / "calibration.json").read_text())
            summary[s] = _write_calibration(tmp / "out" / s, held, method, info)
        keep = {k: v for k, v in marker.items() if k not in ("finished_at", "manifest", "digests")}
        write_success(tmp / "out", {**keep, "fingerprint": fp, "classifiers": summary, "recalibrated": True})
        promote(tmp / "out", out)
    print(f"[classify] refit classifier.calibration={method} of {len(sources)} classifiers (no training)", flush=True)
    return StageResult("classify", {"classifier": str(out)}, {"classifiers": len(sources)}, info=summary)


def read_calibration(folder: str | Path) -> dict[str, Any] | None:
    """A classifier folder's ``calibration.json`` (None when it has none: not a raydora classifier), with
    ``bias`` 0 for folders written before Platt scaling existed."""
    path = Path(folder) / "calibration.json"
    if not path.is_file():
        return None
    return {"bias": 0.0, **json.loads(path.read_text())}


def _encoder_tokenizer(data_dir: Path, out: Path, backbone: tuple[str, str]) -> str:
    """The tokenizer folder the workers load: the backbone's own, or (presets) a BPE trained on the data."""
    if backbone[0] == "path":
        return backbone[1]
    from raydora.models import train_tokenizer

    def texts() -> Any:
        for batch in read_canonical(data_dir).iter_batches(batch_format="pyarrow"):
            for row in batch.select(["prompt", "responses"]).to_pylist():
                yield row["prompt"]
                yield from row["responses"]

    train_tokenizer(texts(), out, kind="encoder")
    return str(out)


def _fit_group(
    sources: list[str],
    datasets: dict[str, Any],
    loop_config: dict[str, Any],
    num_workers: int,
    use_gpu: bool,
    storage: str,
    name: str,
) -> Any:
    """One Ray Train run that trains ``sources``' classifiers one after another; returns its checkpoint. With no
    workers, the same loop in this process (its torch threads restored after); its folder is the checkpoint."""
    from ray.train import Checkpoint, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    named = {f"{split}_{s}": datasets[f"{split}_{s}"] for s in sources for split in ("train", "holdout")}
    if num_workers == 0:
        out, device = str(Path(storage) / name), "cuda" if use_gpu else "cpu"
        with in_this_process(named.values()):
            _train_loop({**loop_config, "sources": sources, "datasets": named, "device": device, "out": out})
        return Checkpoint.from_directory(out)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={**loop_config, "sources": sources},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        datasets=named,
        # Split in order (equal shares, blocks handed out in sequence), not as workers ask for them.
        dataset_config=DataConfig(
            datasets_to_split=[f"train_{s}" for s in sources], execution_options=ordered_ingest()
        ),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"classifiers {sources}: Ray Train returned no checkpoint ({result.error})")
    return result.checkpoint


def _gather(refs: list[Any], groups: list[list[str]]) -> list[Any]:
    """The concurrent runs' checkpoints, in order, once every run has ended. A failed run does not stop the others:
    killing a task mid-``fit()`` leaves its Train run's placement group holding the CPUs or GPUs (seen on the
    2-CPU test cluster, where the next stage then waited forever), while a run left to end releases them. Then
    the first failure is raised, naming its sources (and how many runs failed)."""
    import ray

    ray.wait(refs, num_returns=len(refs))
    checkpoints: list[Any] = []
    errors: list[tuple[list[str], Exception]] = []
    for ref, group in zip(refs, groups, strict=True):
        try:
            checkpoints.append(ray.get(ref))
        except ray.exceptions.RayError as e:  # the task's error (RayTaskError), or its worker's death
            errors.append((group, e))
    if errors:
        group, first = errors[0]
        more = f" ({len(errors)} of {len(refs)} runs failed)" if len(errors) > 1 else ""
        raise RuntimeError(f"classifier run for sources {group} failed{more}: {first}") from first
    return checkpoints


def train_classifiers(
    data_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    seed: int = 0,
    force: bool = False,
    targets: tuple[str, ...] = (GOLDEN,),
) -> StageResult:
    """Train, calibrate and save one classifier per synthetic source found in ``data_dir``: the ``targets``
    sources (``data.target_sources``) against each other source. ``cfg`` is a ``ClassifierConfig``. Skips when
    ``out_dir/_SUCCESS`` matches the data and settings."""
    from ray.data.expressions import col, lit

    data_dir, out = Path(data_dir), Path(out_dir)
    marker = read_success(data_dir) or {}
    settings = {k: getattr(cfg, k) for k in TRAIN_SETTINGS}  # scoring settings do not invalidate the classifiers
    # Only away from their defaults: run folders made before these settings existed stay valid.
    if cfg.calibration != "temperature":
        settings["calibration"] = cfg.calibration
    # auto: CUDA when this process or the Ray cluster has a GPU, as for the scoring pool (in this process with
    # num_workers=0: only this process's GPUs count).
    device = resolve_device(cfg.device, here=cfg.num_workers == 0)
    tag = precision_tag(cfg.precision, device)
    if tag:
        settings["precision"] = tag
    if tuple(targets) != (GOLDEN,):
        settings["targets"] = sorted(targets)
    fp = fingerprint("classify", marker.get("fingerprint", str(data_dir)), settings, seed)
    if not force and is_done(out, fp):
        done = read_success(out) or {}
        return StageResult("classify", {"classifier": str(out)}, done.get("rows", {}), skipped=True, info=done)
    # The training's own fingerprint (the calibration left out): when it matches, only the calibration is refit.
    train_fp = fingerprint("classify", marker.get("fingerprint", str(data_dir)), {**settings, "calibration": 0}, seed)
    previous = read_success(out) or {}
    if not force and previous.get("train_fingerprint") == train_fp and is_done(out, previous.get("fingerprint", "")):
        redone = _recalibrate(out, cfg.calibration, fp)
        if redone is not None:
            return redone
    counts = synthetic_sources(data_dir)
    sources = sorted(s for s in counts if s not in (*targets, UNKNOWN))
    if not sum(counts.get(t, 0) for t in targets) or not sources:
        raise ValueError(
            f"{data_dir}: classifiers need target responses (data.target_sources={list(targets)}) and at least one "
            f"other source; found {counts}"
        )
    backbone = resolve_backbone(cfg.backbone)
    runs = min(cfg.concurrency, len(sources))
    groups = [sources[i::runs] for i in range(runs)]  # dealt round-robin: each run gets its share of the sources
    if device == "cuda":  # Ray would wait forever for GPUs the cluster does not have
        key = "classifier.num_workers" if runs == 1 else f"classifier.concurrency={runs} runs x classifier.num_workers"
        check_gpus(cfg.num_workers * runs, 1, key)
    summary: dict[str, Any] = {}
    with staging(out.parent, out.name) as tmp:
        print(f"[classify] preparing the examples of {len(sources)} classifiers ({', '.join(sources)})", flush=True)
        tokenizer = _encoder_tokenizer(data_dir, tmp / "tokenizer", backbone)
        datasets: dict[str, Any] = {}
        held: dict[str, np.ndarray] = {}
        # Every source's examples in one pass over the data, materialised once before training (small: prompt,
        # response, label); each source's two splits are filtered from them and materialised too, since the Train
        # workers hold the cores and a lazy read would never get a CPU slot. In the data's order (``ordered``):
        # the seeded shuffle below then sees the same stream every run, and a source's examples come in the order
        # they would if exploded alone.
        examples = ordered(
            read_canonical(data_dir).map_batches(
                explode,
                batch_format="pyarrow",
                fn_kwargs={
                    "sources": sources,
                    "holdout_fraction": cfg.holdout_fraction,
                    "seed": seed,
                    "targets": list(targets),
                },
            )
        ).materialize()
        balance = split_counts(examples)
        columns = ["prompt", "response", "label", "holdout", "calib"]
        for source in sources:
            n_golden, n_source = balance.get(source, (0, 0))
            if n_golden == 0 or n_source == 0:
                raise ValueError(f"source {source!r}: the training split has {n_golden} golden, {n_source} {source}")
            mine = col("source") == lit(source)
            train = examples.filter(expr=mine & (col("holdout") == lit(False))).select_columns(columns).materialize()
            holdout = examples.filter(expr=mine & (col("holdout") == lit(True))).select_columns(columns).materialize()
            for ds in (train, holdout):  # bars from inside the workers would redraw under every log line
                ds.context.enable_progress_bars = False
            datasets[f"train_{source}"], datasets[f"holdout_{source}"] = train, holdout
        # One Ray Train run per group of sources, the groups at once (classifier.concurrency; default one group:
        # the workers start once, tens of seconds on a GPU node, and train the classifiers one after another).
        # Each classifier starts from the seed and sees its own data in its own order, so the grouping changes
        # nothing in the results (tests/test_classifier.py).
        loop_config = {
            "seed": seed,
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "batch_size": cfg.batch_size,
            "max_length": cfg.max_length,
            "precision": cfg.precision,
            "tokenizer": tokenizer,
            "backbone": backbone,
            "threads": cfg.threads_per_worker,
        }
        storage = str((tmp / ".ray_train").absolute())
        examples_total = cfg.epochs * sum(sum(balance[s]) for s in sources)
        where = f"{runs} Ray Train run(s) x {cfg.num_workers} workers" if cfg.num_workers else "in this process"
        print(
            f"[classify] {sum(sum(balance[s]) for s in sources):,} training examples x {cfg.epochs} epochs; "
            f"{where} on {device}",
            flush=True,
        )
        bar = Progress("classify", f"training {len(sources)} classifiers", examples_total, "examples")
        with watch(bar) as counter:
            loop_config["progress"] = counter
            fits = [
                (group, datasets, loop_config, cfg.num_workers, device == "cuda", storage, f"classifiers-{i}")
                for i, group in enumerate(groups)
            ]
            if len(fits) == 1:
                checkpoints = [_fit_group(*fits[0])]
            else:
                import ray

                remote = ray.remote(num_cpus=0, max_retries=0)(_fit_group)  # a failed run is reported, not rerun
                checkpoints = _gather([remote.remote(*f) for f in fits], groups)
        bar.finish()
        for group, checkpoint in zip(groups, checkpoints, strict=True):
            with checkpoint.as_directory() as ckpt:
                for source in group:
                    shutil.copytree(Path(ckpt) / source / "model", tmp / source)
                    held[source] = np.load(Path(ckpt) / source / "holdout.npy", allow_pickle=False)
        for source in sources:
            n_golden, n_source = balance[source]
            np.save(tmp / source / "holdout.npy", held[source])  # a later change of calibration refits from it
            info = {
                "source": source,
                "calibration": cfg.calibration,
                "temperature": None,
                "bias": None,
                "gamma": n_source / n_golden,
                "label": "1 = golden",
                "input": "[CLS] prompt [SEP] response [SEP]",
                "backbone": list(backbone),
                "train_examples": {"golden": n_golden, source: n_source},
            }
            summary[source] = _write_calibration(tmp / source, held[source], cfg.calibration, info)
        shutil.rmtree(tmp / ".ray_train", ignore_errors=True)
        write_success(
            tmp,
            {
                "stage": "classify",
                "fingerprint": fp,
                "train_fingerprint": train_fp,
                "sources": sources,
                "response_counts": counts,
                "targets": list(targets),
                "classifiers": summary,
                "training_runs": groups,  # the sources each Ray Train run trained (classifier.concurrency)
                "rows": {"classifiers": len(sources)},
            },
        )
        promote(tmp, out)
    return StageResult("classify", {"classifier": str(out)}, {"classifiers": len(sources)}, info=summary)
