"""Temperature against Platt scaling for the DoRA classifiers, on fresh benchmark rows.

For each base run of the results matrix (``runs/experiments/s<seed>-n00/base``, made by ``make results``; MiniLM
classifiers, one epoch), each source's classifier is calibrated again here on the same calibration half it was
calibrated on (the rows' hashed splits, ``classifier.explode``): once by temperature (``T``, which must equal the
run's ``calibration.json``: checked) and once by Platt scaling (``T`` and ``b``). Both are then measured on fresh
benchmark rows (another seed: ~2,500 golden-vs-source examples per classifier, where ECE's noise floor is ~0.01):
ECE (15 bins) and NLL, uncalibrated, temperature, Platt, and Platt with Platt's smoothed targets. No Ray: the
classifiers run in this process.

    .venv/bin/python -m bench.calibration_compare --out bench/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import record
from raydora import calibration, classifier, synth
from raydora.config import load_config
from raydora.models import load_encoder, load_tokenizer


def margins_of(model: Any, tok: Any, pairs: list[tuple[str, str]], max_length: int) -> np.ndarray:
    return np.concatenate([
        classifier.margins(model, tok, [p for p, _ in pairs[i : i + 128]], [r for _, r in pairs[i : i + 128]],
                           max_length)
        for i in range(0, len(pairs), 128)
    ])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/experiments", help="the results matrix's folder")
    p.add_argument("--fresh-rows", type=int, default=1000, help="fresh benchmark rows (K = 4 responses each)")
    p.add_argument("--fresh-seed", type=int, default=11)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    results = []
    for base in sorted(Path(args.runs).glob("s*-n00/base")):
        cfg = load_config(str(base / "config.yaml"))
        data = pa.concat_tables([pq.read_table(f) for f in sorted((base / "data").glob("*.parquet"))])
        shares = {"golden": cfg.synth.alpha, **cfg.synth.source_shares}
        fresh = list(synth.generate_rows(0, args.fresh_rows, k=cfg.synth.k, shares=shares, label_noise=0.0,
                                         seed=args.fresh_seed))  # fmt: skip
        for folder in sorted(d for d in (base / "classifier").iterdir() if (d / "calibration.json").is_file()):
            source = folder.name
            model, tok = load_encoder(folder).eval(), load_tokenizer(folder)
            ex = classifier.explode(data, [source], cfg.classifier.holdout_fraction, cfg.seed).to_pydict()
            calib = [i for i, (h, c) in enumerate(zip(ex["holdout"], ex["calib"], strict=True)) if h and c]
            z_cal = margins_of(model, tok, [(ex["prompt"][i], ex["response"][i]) for i in calib],
                               cfg.classifier.max_length)  # fmt: skip
            y_cal = np.array([ex["label"][i] for i in calib])
            t = calibration.fit_temperature(z_cal, y_cal)
            saved = classifier.read_calibration(folder)["temperature"]
            assert abs(t - saved) <= 1e-9 * saved, (base, source, t, saved)  # the run's own calibration, redone
            tp, bp = calibration.fit_platt(z_cal, y_cal)
            # Platt's (1999) own targets, (N+ + 1) / (N+ + 2) and 1 / (N- + 2) instead of 1 and 0 (sklearn's
            # sigmoid calibration uses them): a prior against extreme fits on small calibration sets.
            n_pos, n_neg = int(y_cal.sum()), int(len(y_cal) - y_cal.sum())
            soft = np.where(y_cal == 1, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
            ts, bs = calibration.fit_platt(z_cal, soft)
            pairs = [(r["prompt"], x, int(s == "golden")) for r in fresh
                     for x, s in zip(r["responses"], r["sources"], strict=True) if s in ("golden", source)]  # fmt: skip
            z = margins_of(model, tok, [(a, b) for a, b, _ in pairs], cfg.classifier.max_length)
            y = np.array([label for _, _, label in pairs])
            row = {"run": str(base), "source": source, "calibration_examples": len(calib), "fresh_examples": len(y),
                   "fitted_temperature": t, "platt_temperature": tp, "platt_bias": bp,
                   "platt_soft_temperature": ts, "platt_soft_bias": bs}  # fmt: skip
            fits = {"uncalibrated": (1.0, 0.0), "temperature": (t, 0.0), "platt": (tp, bp), "platt_soft": (ts, bs)}
            for name, (tt, bb) in fits.items():
                m = calibration.metrics(z, y, tt, bb)
                row[name] = {"ece": m["ece"], "nll": m["nll"]}
            results.append(row)
            print(f"{base.parent.name} {source:<8} n_cal={len(calib):>3} T={t:.3f} | Platt T={tp:.3f} b={bp:+.3f} | "
                  f"ECE {row['uncalibrated']['ece']:.3f} -> {row['temperature']['ece']:.3f} (T) / "
                  f"{row['platt']['ece']:.3f} (Platt); NLL {row['uncalibrated']['nll']:.3f} -> "
                  f"{row['temperature']['nll']:.3f} / {row['platt']['nll']:.3f} | soft targets T={ts:.3f} b={bs:+.3f} "
                  f"ECE {row['platt_soft']['ece']:.3f} NLL {row['platt_soft']['nll']:.3f}", flush=True)  # fmt: skip
    if not results:
        raise SystemExit(f"no base runs under {args.runs}: run `make results` first")
    summary = {name: {k: float(np.mean([r[name][k] for r in results])) for k in ("ece", "nll")}
               for name in ("uncalibrated", "temperature", "platt", "platt_soft")}  # fmt: skip
    print("mean over classifiers:", json.dumps(summary), flush=True)
    print(f"written to {record('calibration_compare', {'classifiers': results, 'mean': summary}, args.out)}")


if __name__ == "__main__":
    main()
