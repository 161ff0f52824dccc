"""The ``raydora`` command: ``raydora <command> --config FILE [section.key=value ...]``.

Stages register here as they land (see ``docs/``); ``raydora check`` verifies an installation end to end.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence

from raydora import __version__
from raydora.config import ConfigError, RunConfig, dump_yaml, explain, load_config


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

        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            got = ray.get(ray.remote(lambda x: x * 2).remote(21))
            print(f"  [{'ok' if got == 42 else 'FAIL'}] local Ray runs a task (ray {ray.__version__})")
            failed += [] if got == 42 else ["ray"]
        finally:
            ray.shutdown()
    print("self-check passed" if not failed else f"self-check FAILED: {', '.join(failed)}")
    return 1 if failed else 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, RunConfig], int], str]] = {
    "check": (cmd_check, "verify the installation: versions, precision, math library, local Ray"),
    "config": (cmd_config, "print the resolved config (or --explain every key)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydora",
        description="Ray-native distributionally robust preference alignment (DoRA, WDPO, KLDPO).",
    )
    parser.add_argument("--version", action="version", version=f"raydora {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p)
        if name == "check":
            p.add_argument("--ray", action="store_true", help="also start a local Ray and run a task")
        if name == "config":
            p.add_argument("--explain", action="store_true", help="list every key with its default and meaning")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"raydora: config error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"raydora: {e.strerror}: {e.filename}", file=sys.stderr)
        return 2
    fn, _ = COMMANDS[args.command]
    return fn(args, cfg)


if __name__ == "__main__":
    sys.exit(main())
