"""The `mllm-missing` command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

from mllm_missing.errors import MllmMissingError

__all__ = ["main"]


def _add_quickstart(subparsers: Any) -> None:
    from mllm_missing.quickstart import QuickstartConfig

    defaults = QuickstartConfig()
    parser = subparsers.add_parser(
        "quickstart",
        help="train and evaluate on easy-VQA with the offline default encoders",
        description="Train small heads over frozen EfficientNet-Lite0 + MiniLM on easy-VQA with "
        "missing modalities, evaluate at several test missing rates, write results.json, "
        "results.md and a plot.",
    )
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--cache-dir", default=None, help="default: ~/.cache/mllm_missing")
    parser.add_argument("--train-missing", default=defaults.train_missing, help="TYPE:RATE")
    parser.add_argument("--methods", nargs="+", default=list(defaults.methods))
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")


def _run_quickstart(args: argparse.Namespace) -> int:
    from mllm_missing.quickstart import QuickstartConfig, run_quickstart
    from mllm_missing.report import summary_table

    config = QuickstartConfig(
        train_missing=args.train_missing,
        methods=tuple(args.methods),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        output_dir=args.output_dir,
        cache_dir=args.cache_dir,
        threads=args.threads,
    )
    results = run_quickstart(config)
    print(f"\neasy-VQA test accuracy, heads trained with {results['train_label']}:\n")
    print(summary_table(results))
    print(f"\n{results['samples']['train']} train / {results['samples']['test']} test questions; ")
    print(f"finished in {results['seconds']['total']:.0f} s; results in {config.output_dir}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mllm-missing`."""
    from mllm_missing import __version__

    parser = argparse.ArgumentParser(prog="mllm-missing", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_quickstart(subparsers)
    return parser


_COMMANDS = {"quickstart": _run_quickstart}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse `argv`, run the command, turn package errors into a message + exit 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args)
    except MllmMissingError as exc:
        print(f"mllm-missing {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
