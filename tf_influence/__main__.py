"""Command line: ``python -m tf_influence demo [--output-dir DIR] [--seed N] [--quiet]``."""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tf-influence",
        description="Influence functions for TensorFlow 2 and Keras 3.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train a digits classifier and show which training digits helped or hurt "
        "three test predictions (about a minute on a laptop CPU)",
        description="Train a softmax regression on scikit-learn's digits, explain three test "
        "digits with influence functions, save a PNG of the most helpful and most harmful "
        "training digits, and check the scores against leave-one-out retraining.",
    )
    demo.add_argument(
        "--output-dir",
        default="demo_output",
        help="folder for the picture (default: %(default)s)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def main(argv=None) -> int:
    """Entry point of ``tf-influence`` and ``python -m tf_influence``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        from tf_influence.demo import run_demo

        run_demo(output_dir=args.output_dir, seed=args.seed, verbose=0 if args.quiet else 1)
        return 0
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
