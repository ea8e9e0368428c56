"""Command line of ``tf-influence`` (also ``python -m tf_influence``).

* ``demo [--output-dir DIR] [--seed N] [--quiet]``
* ``explain-logs --model DIR --train DATA.npz --logs FILE --out results.csv [...]``
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


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
    logs = commands.add_parser(
        "explain-logs",
        help="explain requests logged by TF Serving (PredictionLog TFRecords)",
        description="Explain every request of a TF Serving request log against the training "
        "data: write the top-k most helpful and most harmful training examples per logged "
        "example to a CSV file. Bad records are reported and skipped.",
    )
    logs.add_argument(
        "--model",
        required=True,
        help="SavedModel directory (TF Serving layout, e.g. models/name) or a .keras file",
    )
    logs.add_argument("--train", required=True, help=".npz file with arrays x and y")
    logs.add_argument("--logs", required=True, help="TFRecord file of PredictionLog records")
    logs.add_argument("--out", required=True, help="CSV file to write")
    logs.add_argument(
        "--loss",
        default=None,
        help="Keras loss name (required for a SavedModel, which stores none)",
    )
    logs.add_argument(
        "--solver",
        default="cg",
        help="exact, cg, lissa, arnoldi or projected (default: %(default)s)",
    )
    logs.add_argument(
        "--dim",
        type=int,
        default=None,
        help="coordinates per training example of --solver projected (default: 4096)",
    )
    logs.add_argument(
        "--from-logits",
        action="store_true",
        help="the model outputs logits (for the cross-entropy losses)",
    )
    logs.add_argument("--damping", type=float, default=1e-3, help="(default: %(default)s)")
    logs.add_argument("--top-k", type=int, default=10, help="(default: %(default)s)")
    logs.add_argument(
        "--signature",
        default="serving_default",
        help="signature whose requests are explained (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
    if args.command == "explain-logs":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        return _explain_logs(args)
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


def _explain_logs(args: argparse.Namespace) -> int:
    import keras

    import tf_influence as tfi
    from tf_influence.logs import explain_logs, load_training_arrays
    from tf_influence.serving import resolve_version_dir

    input_names = None
    if os.path.isdir(args.model):
        import tensorflow as tf

        directory = resolve_version_dir(args.model)
        model = tfi.load_served_model(directory)
        # The model's inputs follow the `serve` endpoint's order; requests name them.
        input_names = [s.name for s in tf.saved_model.load(directory).serve.input_signature]
    else:
        model = keras.saving.load_model(args.model, safe_mode=True)  # no arbitrary code
    x, y = load_training_arrays(args.train)
    loss = args.loss
    if loss is not None and args.from_logits:
        name = "".join(part.capitalize() for part in loss.split("_"))
        if not hasattr(keras.losses, name):
            raise SystemExit(f"--from-logits: unknown loss class for --loss {loss!r}")
        loss = getattr(keras.losses, name)(from_logits=True)
    solver = args.solver
    if args.dim is not None:
        if solver != "projected":
            raise SystemExit(f"--dim is for --solver projected. Received: --solver {solver}")
        solver = tfi.solvers.Projected(dim=args.dim)
    im = tfi.InfluenceModel(model, loss=loss)
    im.compile(solver=solver, damping=args.damping)
    im.fit(x, y, verbose=0)
    explain_logs(
        im,
        args.logs,
        args.out,
        top_k=args.top_k,
        signature_name=args.signature,
        input_names=input_names,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
