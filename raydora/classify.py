"""The classify stage, DoRA stage 1: train and calibrate the classifiers (:mod:`raydora.classifier`), then score:
stream the validated rows through every calibrated classifier on a Ray Data actor pool, adding ``p_golden`` (one
calibrated probability per response) and ``p_golden_by_source``.

**Which classifier scores a response.** A response from synthetic source ``s`` gets ``p_golden = c_s``, the
calibrated probability of its own classifier (golden vs ``s``), exactly what DoRA's weight
``1 / (alpha + pi_s * (1 - p) / (gamma_s * p))`` expects. A ``golden`` or ``unknown`` response has no own
classifier; it gets the probability of "golden vs the synthetic *mixture*":

    (1 - p*) / p* = sum_i (beta_i / sum_j beta_j) * (1 - c_i) / (gamma_i * c_i)

i.e. the share-weighted average of the inverse density ratios ``Q_i / Q0``. With ``pi = sum_j beta_j`` and
``gamma = 1``, DoRA's formula then yields ``Q0 / (alpha Q0 + sum_i beta_i Q_i)`` = dQ0/dP, the exact mixture
density ratio. The shares ``beta_i`` default to the response counts of the data (``classifier.source_shares``
overrides them), and ``p_golden_by_source`` keeps every classifier's ``c_i``, so new shares need no rescoring.

We store probabilities, not weights: ``robust.dora_weights`` turns them into h~ at train time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydora import calibration
from raydora.classifier import GOLDEN, margins, precision_tag, read_calibration
from raydora.cluster import resolve_device
from raydora.config import RunConfig
from raydora.data import IO_CPUS, map_rows, read_canonical, write_rows
from raydora.progress import Progress, watch
from raydora.rundir import StageResult, fingerprint, is_done, promote, read_success, staging, write_success

EPS = 1e-6


def mixture_p_golden(p_by_source: np.ndarray, shares: np.ndarray, gammas: np.ndarray) -> np.ndarray:
    """``p*`` of "golden vs the synthetic mixture" from per-classifier probabilities ``[n, S]``, the sources'
    mixture shares ``[S]`` and imbalance ratios ``[S]`` (see the module docstring). Returns ``[n]``."""
    c = np.clip(p_by_source, EPS, 1 - EPS)
    w = shares / shares.sum()
    inverse_ratio = ((1 - c) / (gammas * c)) @ w  # sum_i w_i Q_i / Q0
    p: np.ndarray = 1 / (1 + inverse_ratio)
    return p


class Scorer:
    """Ray Data callable class: loads every classifier once per actor, then scores batches of canonical rows."""

    def __init__(
        self,
        classifier_dir: str,
        sources: list[str],
        shares: list[float],
        max_length: int,
        threads: int = 0,
        device: str = "cpu",
        batch_size: int = 64,
        precision: str | None = "fp32",
        progress: Any = None,
    ) -> None:
        import torch

        from raydora.models import load_encoder, load_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.sources, self.max_length, self.batch_size, self.precision = sources, max_length, batch_size, precision
        self.progress = progress  # a progress.Counter actor (or None): told the rows of every scored batch
        self.shares = np.asarray(shares, dtype=np.float64)
        self.models, self.tokenizers, temps, biases, gammas = [], [], [], [], []
        for s in sources:
            folder = Path(classifier_dir) / s
            cal = read_calibration(folder)
            if cal is None:
                raise FileNotFoundError(f"{folder}: no calibration.json (not a trained classifier)")
            model: Any = load_encoder(folder)
            self.models.append(model.to(device).eval())
            self.tokenizers.append(load_tokenizer(folder))
            temps.append(cal["temperature"])
            biases.append(cal["bias"])
            gammas.append(cal["gamma"])
        self.temperatures, self.biases, self.gammas = np.asarray(temps), np.asarray(biases), np.asarray(gammas)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(["prompt", "responses", "sources"]).to_pylist()
        prompts = [r["prompt"] for r in rows for _ in r["responses"]]
        responses = [x for r in rows for x in r["responses"]]
        probs = np.zeros((len(responses), len(self.sources)))
        for j, (model, tok) in enumerate(zip(self.models, self.tokenizers, strict=True)):
            for i in range(0, len(responses), self.batch_size):
                sl = slice(i, i + self.batch_size)
                z = margins(model, tok, prompts[sl], responses[sl], self.max_length, self.precision)
                probs[sl, j] = calibration.calibrated(z, self.temperatures[j], self.biases[j])
        mixture = mixture_p_golden(probs, self.shares, self.gammas)
        own = {s: j for j, s in enumerate(self.sources)}
        flat_sources = [s for r in rows for s in r["sources"]]
        p = np.array([probs[i, own[s]] if s in own else mixture[i] for i, s in enumerate(flat_sources)])
        p_col, by_col, k = [], [], 0
        for r in rows:
            n = len(r["responses"])
            p_col.append(p[k : k + n].tolist())
            by_col.append(probs[k : k + n].tolist())
            k += n
        batch = batch.append_column("p_golden", pa.array(p_col, pa.list_(pa.float64())))
        if self.progress is not None:
            self.progress.add.remote(batch.num_rows)
        return batch.append_column("p_golden_by_source", pa.array(by_col, pa.list_(pa.list_(pa.float64()))))


def estimate_shares(response_counts: dict[str, int], sources: list[str]) -> list[float]:
    """Mixture shares of the synthetic sources estimated from the data's response counts."""
    total = sum(response_counts.values())
    return [response_counts.get(s, 0) / total for s in sources]


def score(
    data_dir: str | Path,
    classifier_dir: str | Path,
    out_dir: str | Path,
    cfg: Any,
    force: bool = False,
    form: str = "per_source",
) -> StageResult:
    """Score ``data_dir`` into ``out_dir`` (canonical rows + ``p_golden`` + ``p_golden_by_source``), streaming
    through ``cfg.score_actors`` actors. Atomic; skips when ``out_dir/_SUCCESS`` matches. ``form`` (recorded for
    the DoRA weights): ``per_source`` classifiers, or one ``target_vs_mixture`` classifier (``data.target``)."""
    clf = read_success(classifier_dir)
    if clf is None:
        raise FileNotFoundError(f"{classifier_dir}: no finished classifiers (_SUCCESS missing); run classify first")
    sources: list[str] = clf["sources"]
    shares = (
        [cfg.source_shares[s] for s in sources]
        if cfg.source_shares
        else estimate_shares(clf["response_counts"], sources)
    )
    out = Path(out_dir)
    device = resolve_device(cfg.device)
    tag = precision_tag(cfg.precision, device)  # as classify: only bf16, so fp32 run folders stay valid
    fp = fingerprint(
        "score",
        (read_success(data_dir) or {}).get("fingerprint"),
        clf["fingerprint"],
        shares,
        cfg.max_length,
        *([tag] if tag else []),
        *([form] if form != "per_source" else []),
    )
    if not force and is_done(out, fp):
        done = read_success(out) or {}
        return StageResult("score", {"scored": str(out)}, done.get("rows", {}), skipped=True)
    with staging(out.parent, out.name) as tmp:
        # Read tasks of 4 scoring batches: enough blocks to keep every actor busy (see read_canonical), cut at
        # batch multiples that do not depend on the pool size, so the results do not either.
        rows_in = read_canonical(
            data_dir, num_cpus=IO_CPUS, block_rows=cfg.score_batch_size, slice_rows=4 * cfg.score_batch_size
        )
        total = sum(pq.ParquetFile(f).metadata.num_rows for f in Path(data_dir).glob("*.parquet"))
        bar = Progress("classify", f"scoring with {len(sources)} classifiers", total, "rows")
        with watch(bar) as counter:
            rows = map_rows(
                rows_in,
                Scorer,
                {
                    "classifier_dir": str(Path(classifier_dir).absolute()),
                    "sources": sources,
                    "shares": shares,
                    "max_length": cfg.max_length,
                    "threads": cfg.threads_per_worker,
                    "device": device,
                    "batch_size": cfg.score_batch_size,
                    "precision": cfg.precision,
                    "progress": counter,
                },
                tmp / "scored",
                keys=("classifier.score_actors", "classifier.actor_cpus"),
                batch_size=cfg.score_batch_size,
                actors=cfg.score_actors,
                actor_cpus=cfg.actor_cpus,
                gpus=1 if device == "cuda" else 0,
            )
        bar.finish(rows)
        write_success(
            tmp / "scored",
            {
                "stage": "score",
                "fingerprint": fp,
                "classifiers": sources,
                "form": form,
                "shares": dict(zip(sources, shares, strict=True)),
                "golden_share": sum(clf["response_counts"].get(t, 0) for t in clf.get("targets", [GOLDEN]))
                / max(1, sum(clf["response_counts"].values())),
                "rows": {"scored": rows},
            },
        )
        promote(tmp / "scored", out)
    return StageResult("score", {"scored": str(out)}, {"scored": rows})


def run(cfg: RunConfig, run_dir: str | Path, *, force: bool = False) -> StageResult:
    """Pipeline stage ``classify``: train + calibrate the classifiers, then score ``data/`` into ``scored/``
    (``force``: both again, even when up to date)."""
    from raydora.classifier import train_classifiers

    run_dir = Path(run_dir)
    clf = dataclasses.replace(cfg.classifier, precision=cfg.classifier_precision)
    examples, targets, form = run_dir / "data", tuple(cfg.data.target_sources), "per_source"
    if cfg.data.target is not None:  # one classifier: the target's answers against every training response
        examples, targets, form = target_vs_mixture_rows(run_dir), (TARGET,), "target_vs_mixture"
        clf = dataclasses.replace(clf, source_shares={MIXTURE: 1.0})
    trained = train_classifiers(examples, run_dir / "classifier", clf, cfg.seed, force=force, targets=targets)
    print(trained.summary(), flush=True)
    for source, s in sorted(trained.info.items()) if not trained.skipped else []:
        print(
            f"  {source:<10} gamma={s['gamma']:.3f} T={s['temperature']:.3f} b={s['bias']:.3f} "
            f"AUC={s['auc']:.3f} ECE {s['ece_before']:.3f} -> {s['ece_after']:.3f}"
        )
    return score(run_dir / "data", run_dir / "classifier", run_dir / "scored", clf, force=force, form=form)


TARGET, MIXTURE = "target", "mixture"  # the source names of data.target's rows and of every training response


def _as_mixture(batch: pa.Table) -> pa.Table:
    """Ray Data UDF: canonical rows with every response's source set to ``mixture``."""
    sources = [[MIXTURE] * len(r) for r in batch.column("responses").to_pylist()]
    return batch.set_column(
        batch.schema.get_field_index("sources"), "sources", pa.array(sources, pa.list_(pa.string()))
    )


def target_vs_mixture_rows(run_dir: Path) -> Path:
    """``classify_data/``: the training rows with every response's source ``mixture``, plus ``target/``'s rows
    (source ``target``): the examples of the one target-vs-mixture classifier (``data.target``). Written once per
    data and target (fingerprint)."""
    from raydora.data import CANONICAL_SCHEMA

    data, target, out = run_dir / "data", run_dir / "target", run_dir / "classify_data"
    if read_success(target) is None:
        raise FileNotFoundError(f"{target}: no target rows (_SUCCESS missing); data.target is read by validate")
    fp = fingerprint(
        "classify_data", (read_success(data) or {}).get("fingerprint"), (read_success(target) or {}).get("fingerprint")
    )
    if is_done(out, fp):
        return out
    columns = [f.name for f in CANONICAL_SCHEMA]
    with staging(run_dir, "classify_data") as tmp:
        rows = read_canonical(data).map_batches(_as_mixture, batch_format="pyarrow").select_columns(columns)
        rows = rows.union(read_canonical(target).select_columns(columns))
        n = write_rows(rows, tmp / "rows")
        write_success(tmp / "rows", {"stage": "classify_data", "fingerprint": fp, "rows": {"classify_data": n}})
        promote(tmp / "rows", out)
    return out
