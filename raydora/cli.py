"""The ``raydora`` command: ``raydora <command> --config FILE [section.key=value ...]``.

``raydora pipeline`` runs every stage; each stage also has its own command. ``raydora check`` verifies an
installation end to end.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from raydora import __version__
from raydora.config import ConfigError, RunConfig, dump_yaml, explain, load_config
from raydora.schema import FORMATS


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted overrides, e.g. train.lam=0.5")


def cmd_config(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Print the resolved config as YAML, or every key with its default and meaning (--explain)."""
    if args.explain:
        for key, default, doc in explain():
            print(f"{key:<32} {default:<24} {doc}")
    else:
        print(dump_yaml(cfg), end="")
    return 0


def cmd_check(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Self-check: versions, device and precision, the math library's known values, and (--ray) a local Ray."""
    import torch
    import transformers

    from raydora import hardware, losses, robust

    device = hardware.default_device()
    print(f"raydora {__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    dtype = hardware.resolve_precision(cfg.model.precision, device)
    print(f"device {device}  precision {str(dtype).removeprefix('torch.')} (model.precision={cfg.model.precision})")
    zero = torch.zeros(1, dtype=torch.float64)
    checks = {
        "dpo at zero margin is log 2": float(losses.dpo(zero, zero, zero, zero)[0]) - math.log(2),
        "kl_dro of equal losses is the loss": float(robust.kl_dro(torch.full((4,), 0.3, dtype=torch.float64))) - 0.3,
        "dora weight at p=0.5, alpha=pi=1/4 is 2": float(robust.dora_weights(torch.tensor([0.5]), 0.25, 0.25)[0]) - 2,
    }
    failed = [name for name, err in checks.items() if abs(err) > 1e-6]
    for name in checks:
        print(f"  [{'FAIL' if name in failed else 'ok'}] {name}")
    if args.ray:
        import ray

        from raydora.cluster import package_guard

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False, **package_guard())
        try:
            double: Any = ray.remote(lambda x: x * 2)
            got = ray.get(double.remote(21))
            print(f"  [{'ok' if got == 42 else 'FAIL'}] local Ray runs a task (ray {ray.__version__})")
            failed += [] if got == 42 else ["ray"]
        finally:
            ray.shutdown()
    print("self-check passed" if not failed else f"self-check FAILED: {', '.join(failed)}")
    return 1 if failed else 0


def cmd_synth(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Generate the offline shift benchmark (train / oracle / sft / eval JSON lines) with Ray Data."""
    from raydora import synth
    from raydora.cluster import init_ray

    s = cfg.synth
    init_ray(cfg.ray)
    result = synth.write_benchmark(
        args.output or cfg.run_dir / "synth",
        rows=args.rows or s.rows,
        k=args.k or s.k,
        alpha=s.alpha,
        source_shares=s.source_shares,
        label_noise=s.label_noise if args.label_noise is None else args.label_noise,
        seed=cfg.seed if args.seed is None else args.seed,
        eval_rows=s.eval_rows,
        force=args.force,
    )
    print(result.summary())
    if result.info.get("label_disagreement"):
        print(f"labels vs gold, share of pairs ordered differently: {result.info['label_disagreement']}")
    return 0


def cmd_validate(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Read and validate preference data into <output>/data (valid) and <output>/quarantine (with reasons)."""
    from raydora import inputs, validate
    from raydora.cluster import init_ray

    source = args.input or cfg.data.input
    if source is None:
        print("raydora validate: give --input PATH (or data.input in the config)", file=sys.stderr)
        return 2
    try:
        if not inputs.is_hub(source):  # a missing path or a folder without inputs fails before Ray starts
            inputs.scan_inputs(source)
        init_ray(cfg.ray)
        if args.input or args.output or args.format:  # a standalone validation of any input into any folder
            result = validate.validate(
                source,
                args.output or cfg.run_dir,
                args.format or cfg.data.format,
                cfg.data.max_chars,
                cfg.model.tokenizer,
                force=args.force,
            )
        else:  # the run's validate stage: held-out prompts, the run's tokenizer, token limits, target sources
            result = validate.run(cfg, cfg.run_dir, force=args.force)
    except (inputs.InputError, FileNotFoundError) as e:  # the input is unusable: say why, no traceback
        print(f"raydora validate: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    for reason, n in sorted(result.info.get("reasons", {}).items()):
        print(f"  quarantined {n:>8}  {reason}")
    return 0


def cmd_classify(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Train + calibrate the per-source classifiers on <run>/data, then score it into <run>/scored."""
    from raydora import classify
    from raydora.cluster import init_ray

    init_ray(cfg.ray)
    print(classify.run(cfg, cfg.run_dir, force=args.force).summary())
    return 0


def _stage_command(stage: str) -> Callable[[argparse.Namespace, RunConfig], int]:
    def cmd(args: argparse.Namespace, cfg: RunConfig) -> int:
        from raydora import pipeline, run_stage

        result = run_stage(cfg, stage, force=args.force)
        print(result.summary())
        for key, path in result.outputs.items():
            print(f"  {key}: {path}")
        pipeline.report(result)
        return 0

    cmd.__doc__ = f"Run the {stage} stage on <root>/<name>/."
    return cmd


def cmd_generate(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Sample from the run's policies on held-out prompts (the stage), or from --model into --out."""
    if args.model is None:
        return _stage_command("generate")(args, cfg)
    import pyarrow.parquet as pq

    from raydora import generate as gen
    from raydora.cluster import init_ray
    from raydora.rundir import fingerprint

    if args.out is None:
        print("raydora generate: --model needs --out DIR", file=sys.stderr)
        return 2
    prompts = gen.read_prompts(args.prompts or gen.prompt_source(cfg, cfg.run_dir.absolute()), args.limit)
    sampling = gen.Sampling.from_config(cfg.generate, cfg.seed)
    init_ray(cfg.ray)
    fp = fingerprint("generate-cli", args.model, sampling.seed)
    info = gen.generate(
        args.model,
        prompts,
        args.out,
        cfg.generate,
        sampling,
        max_length=cfg.model.max_length,
        precision=cfg.model.precision,
        fp=fp,
    )
    print(
        f"[generate] {info['rows']['prompts']} prompts x {sampling.n} samples -> {args.out} "
        f"({info['backend']}, {info['tokens']} tokens, {info['tokens_per_s']} tokens/s)"
    )
    if args.preferences:
        from pathlib import Path

        import pyarrow as pa

        from raydora.loop import to_preferences
        from raydora.rewards import named_reward

        reward = named_reward(args.reward, cfg.model.max_length)
        rows, dropped = to_preferences(gen.read_generations(args.out), reward, args.source)
        out = Path(args.preferences)
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / "preferences.parquet")
        print(
            f"[generate] {len(rows)} preference rows -> {out}/preferences.parquet ({dropped} prompts without a "
            "preference dropped); validate them with: raydora validate --input " + str(out)
        )
    return 0


def cmd_report(args: argparse.Namespace, cfg: RunConfig | None) -> int:
    """Compare several runs' evaluations in one table (and plots with --out)."""
    from raydora import evaluate

    text, _ = evaluate.compare(args.run_dirs, args.out)
    print(text, end="")
    if args.out:
        print(f"written: {args.out}/report.md, report.json, winrate.png, reward_vs_alpha.png")
    return 0


def cmd_pipeline(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Run the pipeline's stages in order over <root>/<name>/ (each skips itself when up to date)."""
    from raydora import inputs, pipeline

    try:
        pipeline.run(cfg, args.stages.split(",") if args.stages else None)
    except inputs.InputError as e:  # stop at the validate stage, before a later one fails for want of data/
        print(f"raydora pipeline: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_loop(args: argparse.Namespace, cfg: RunConfig) -> int:
    """The online loop over the run directory: sample, label, train from the current policy, repeated."""
    from raydora import loop

    summaries = loop.run(cfg, args.rounds)
    print(loop.table(summaries), end="")
    return 0


def cmd_tune(args: argparse.Namespace, cfg: RunConfig) -> int:
    """A Ray Tune search over ``tune.space``: trials are child runs of <root>/<name>/, selected on validation pairs."""
    from raydora import tune

    try:
        tune.run(cfg)
    except ConfigError as e:  # the space, the validation set, or a restore with other settings
        print(f"raydora: config error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # interrupted (rerun to resume), or no trial finished
        print(f"raydora tune: {e}", file=sys.stderr)
        return 1
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, RunConfig], int], str]] = {
    "check": (cmd_check, "verify the installation: versions, precision, math library, local Ray"),
    "config": (cmd_config, "print the resolved config (or --explain every key)"),
    "synth": (cmd_synth, "generate the offline distribution-shift benchmark"),
    "validate": (cmd_validate, "read + validate preference data into data/ and quarantine/"),
    "classify": (cmd_classify, "train, calibrate and apply the golden-vs-source classifiers (DoRA stage 1)"),
    "sft": (_stage_command("sft"), "SFT warm start of model.policy on the SFT corpus (Ray Train) into sft/final"),
    "reference": (
        _stage_command("reference"),
        "reference log-probs of every row (Ray Data actor pool) into reference/",
    ),
    "train": (_stage_command("train"), "robust preference optimisation (Ray Train, N workers) into train/"),
    "generate": (cmd_generate, "sample the policies on held-out prompts (vLLM or transformers, Ray Data)"),
    "evaluate": (_stage_command("evaluate"), "win rates, breakdowns, shift sweep and plots into eval/"),
    "report": (cmd_report, "compare several runs' evaluations: raydora report RUN_DIR... [--out DIR]"),
    "pipeline": (cmd_pipeline, "run the stages in order over the run directory"),
    "loop": (cmd_loop, "the online loop: sample the policy, label, train from it; repeated (after the pipeline)"),
    "tune": (cmd_tune, "search tune.space on Ray Tune (trials reuse the upstream stages; chosen on tune.validation)"),
}


def _extra_args(name: str, p: argparse.ArgumentParser) -> None:
    if name == "check":
        p.add_argument("--ray", action="store_true", help="also start a local Ray and run a task")
    elif name == "config":
        p.add_argument("--explain", action="store_true", help="list every key with its default and meaning")
    elif name == "synth":
        p.add_argument("--output", help="output folder (default: <root>/<name>/synth)")
        p.add_argument("--rows", type=int, help="prompts (default: synth.rows)")
        p.add_argument("--seed", type=int, help="seed (default: seed)")
        p.add_argument("--k", type=int, help="responses per prompt (default: synth.k)")
        p.add_argument("--label-noise", type=float, help="share of rows with shuffled labels (synth.label_noise)")
    elif name == "validate":
        p.add_argument(
            "--input",
            help="file or folder: .jsonl .json .parquet (also .gz .bz2 .xz .zst), a saved HF "
            "datasets folder, or hf://ORG/NAME[@config][:split] from the local HF datasets cache",
        )
        p.add_argument("--format", choices=["auto", *FORMATS], help="row layout (default: detect)")
        p.add_argument("--output", help="output folder for data/ and quarantine/ (default: <root>/<name>)")
    elif name == "pipeline":
        p.add_argument(
            "--stages", help="comma-separated subset, e.g. synth,validate,classify,sft,reference,train (default: all)"
        )
    elif name == "loop":
        p.add_argument("--rounds", type=int, help="rounds (default: loop.rounds)")
    elif name == "generate":
        p.add_argument("--model", help="a model folder to sample from instead of the run's policies (needs --out)")
        p.add_argument("--prompts", help="prompt file or folder (default: generate.prompts or the benchmark's eval)")
        p.add_argument("--limit", type=int, help="only the first N prompts")
        p.add_argument("--out", help="output folder for --model")
        p.add_argument("--preferences", help="also write preference rows of the samples into this folder")
        p.add_argument("--reward", default="gold", help="scores for --preferences: gold, biased, or a model folder")
        p.add_argument("--source", default="policy", help="source tag of the samples in --preferences")
    if name in ("synth", "validate", "classify", "sft", "reference", "train", "generate", "evaluate"):
        p.add_argument("--force", action="store_true", help="redo even when the outputs are up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydora",
        description="Ray-native distributionally robust preference alignment (DoRA, WDPO, KLDPO).",
    )
    parser.add_argument("--version", action="version", version=f"raydora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "report":
            p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding eval/report.json")
            p.add_argument("--out", help="write report.md, report.json and plots here")
            continue
        _add_config_args(p)
        _extra_args(name, p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return cmd_report(args, None)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"raydora: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"raydora: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    if args.command not in ("check", "config", "synth"):
        from raydora.paths import resolve_model_paths

        try:
            cfg = resolve_model_paths(cfg)
        except ConfigError as e:
            print(f"raydora: config error: {e}", file=sys.stderr)
            return 2
    fn, _ = COMMANDS[args.command]
    return fn(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
