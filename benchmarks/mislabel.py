"""Koh & Liang (2017, section 5.4): fraction of flipped labels found vs fraction inspected.

Three models, 10% of the training labels flipped, training examples inspected in
the order of a ranking; each ranking's curve is averaged over seeds:

* ``logistic``: breast-cancer degree-2 features, L2 logistic regression fitted to
  the noisy labels (float64; ``tf_influence.experiments.mislabel_run``, shared with
  the test). Rankings: self-influence with the Exact solver, with ``KFAC()`` and
  with ``EKFAC()`` (all at the damping ``"auto"`` chose for Exact, ten times the
  mean eigenvalue of the Hessian), training loss, random.
* ``mlp`` and ``cnn``: the digits networks of ``benchmarks.common.digits``
  (64-128-128-10 tanh, 26,122 parameters; Conv2D(16) -> Conv2D(32) -> Dense(10),
  9,930 parameters), 10% of the 1,437 training labels flipped to another class,
  trained on the noisy labels for ``--epochs`` epochs of Adam. Rankings:
  self-influence with CG on the Gauss-Newton matrix (relative residual 1e-5, the
  reference), with ``KFAC()`` and with ``EKFAC()``, all at the damping of
  ``digits.DAMPING`` (0.01 for the MLP, 0.05 for the CNN), training loss, random.
* ``resnet``: the residual CNN of ``notebooks/06_ekfac_cnn.ipynb``
  (``cnn.build_model(cnn.SMALL_STAGES, size=16)``, 16x16x3 digits, one residual block
  per stage of 32, 64 and 128 channels with BatchNormalization, 309,994 parameters),
  10% of its 1,500 training labels flipped, 20 epochs of Adam. Rankings:
  self-influence with ``KFAC()`` and ``EKFAC()`` at damping 5e-3 (EK-FAC's
  ``"auto"`` in the notebook), training loss, random; no CG (hundreds of
  iterations per solve on such a network, and self-influence solves for every
  training example).

All rankings of a seed share one model, one set of flips, and one run.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.mislabel                       # all three models
    .venv/bin/python -m benchmarks.mislabel --models logistic     # 10 seeds, about 30 s
    .venv/bin/python -m benchmarks.mislabel --models mlp,cnn --network-seeds 3
    .venv/bin/python -m benchmarks.mislabel --models resnet --network-seeds 1
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks.common import cnn, digits
from benchmarks.common.timing import log

BUDGETS = (0.05, 0.10, 0.20, 0.30)
MODELS = ("logistic", "mlp", "cnn", "resnet")
FLIP_FRACTION = 0.10
CG_TOL = 1e-5
RESNET_SIZE = 16
RESNET_EPOCHS = 20
RESNET_DAMPING = 5e-3


def factored_solvers():
    """``{name: solver}`` of the factored curvature approximations compared here."""
    import tf_influence as tfi

    return {"K-FAC": tfi.solvers.KFAC(), "EK-FAC": tfi.solvers.EKFAC()}


def flip_labels(labels, seed, num_classes=10):
    """``(noisy labels, flipped mask)``: ``FLIP_FRACTION`` of ``labels`` moved to another class."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(round(FLIP_FRACTION * n)), replace=False)] = True
    noisy = labels.copy()
    shift = rng.integers(1, num_classes, int(flipped.sum()))
    noisy[flipped] = (labels[flipped] + shift) % num_classes
    return noisy, flipped


def network(name, seed):
    """``(model, data, damping, solvers)`` of a network, ``model`` untrained."""
    import tf_influence as tfi

    solvers = {}
    if name == "resnet":
        data = cnn.load_data(cnn.NUM_TRAIN, size=RESNET_SIZE)
        model = cnn.build_model(cnn.SMALL_STAGES, size=RESNET_SIZE, momentum=0.9, seed=seed)
        damping = RESNET_DAMPING
    else:
        x_train, y_train, x_test, y_test = digits.load_data()
        data = (digits.inputs(name, x_train), y_train, digits.inputs(name, x_test), y_test)
        model = digits.build_model(name, seed=seed)
        damping = digits.DAMPING[name]
        solvers["CG"] = tfi.solvers.CG(tol=CG_TOL, max_iter=digits.CG_MAX_ITER)
    solvers.update(factored_solvers())
    return model, data, damping, solvers


def network_run(name, seed, epochs):
    """One seed of a network: flips, training, and every ranking's curve.

    Returns:
        ``(curves, info)``: ``curves`` maps each ranking to its ``MislabelCurve``;
        ``info`` holds the test accuracy, the fraction of flipped labels the
        network predicts (it has fitted them), the damping, the number of
        parameters and each solver's seconds (``fit`` + ``self_influence``).
    """
    import tf_influence as tfi
    from tf_influence.evaluation import mislabel_curve

    model, data, damping, solvers = network(name, seed)
    x_train, y_train, x_test, y_test = data
    noisy, flipped = flip_labels(y_train, seed)
    model.fit(x_train, noisy, epochs=epochs, batch_size=32, verbose=0)
    predicted = np.argmax(model.predict(x_train, verbose=0), axis=1)
    accuracy = float(np.mean(np.argmax(model.predict(x_test, verbose=0), axis=1) == y_test))
    info = {
        "accuracy": accuracy,
        "fitted flips": float(np.mean(predicted[flipped] == noisy[flipped])),
        "damping": damping,
        "parameters": model.count_params(),
        "training points": len(x_train),
    }
    rankings = {}
    for label, solver in solvers.items():
        start = time.perf_counter()
        im = tfi.InfluenceModel(model)
        im.compile(solver=solver, damping=damping, curvature="gauss_newton")
        im.fit(x_train, noisy, batch_size=128, verbose=0)
        rankings[f"self-influence ({label})"] = im.self_influence(verbose=0)
        info[f"seconds {label}"] = time.perf_counter() - start
    rankings["training loss"] = im.objective.per_example_loss(x_train, noisy).numpy()
    rankings["random"] = np.random.default_rng(seed + 1000).random(len(noisy))
    curves = {label: mislabel_curve(values, flipped) for label, values in rankings.items()}
    return curves, info


def print_table(title, rows):
    header = " | ".join(f"found at {b:.0%}" for b in BUDGETS)
    print(f"\n{title}\n")
    print(f"| ranking | {header} | mean over 5-30% |")
    print("|---" * (len(BUDGETS) + 2) + "|")
    for name, values in rows.items():
        mean = np.mean(values, axis=0)
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in mean) + " |", flush=True)


def curve_values(curve):
    return [curve.at(b) for b in BUDGETS] + [curve.mean_found(0.05, 0.30)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the logistic model")
    parser.add_argument("--network-seeds", type=int, default=3, help="seeds of mlp and cnn")
    parser.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: 30, resnet 20)"
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error(f"--models takes {', '.join(MODELS)}. Received: {', '.join(unknown)}")
    warnings.simplefilter("ignore", UserWarning)

    if "logistic" in models:
        from tf_influence.experiments import load_mislabel_features, mislabel_run

        x, y = load_mislabel_features()
        rows = {}
        for seed in range(args.seeds):
            log(f"logistic, seed {seed}")
            curves, _ = mislabel_run(seed, x, y, solvers=factored_solvers())
            for name, curve in curves.items():
                rows.setdefault(name, []).append(curve_values(curve))
        print_table(
            f"logistic regression, breast-cancer degree-2 features (569 x 495), "
            f"{args.seeds} seeds; self-influence (Exact / K-FAC / EK-FAC) at the damping that "
            'Exact\'s "auto" chose',
            rows,
        )

    for name in [m for m in models if m != "logistic"]:
        epochs = args.epochs or (RESNET_EPOCHS if name == "resnet" else digits.EPOCHS)
        rows, infos = {}, []
        for seed in range(args.network_seeds):
            log(f"{name}, seed {seed}")
            curves, info = network_run(name, seed, epochs)
            infos.append(info)
            for label, curve in curves.items():
                rows.setdefault(label, []).append(curve_values(curve))
        mean = {key: np.mean([i[key] for i in infos]) for key in infos[0]}
        seconds = ", ".join(
            f"{key.split(' ', 1)[1]} {value:.0f} s"
            for key, value in mean.items()
            if "seconds" in key
        )
        print_table(
            f"{name}, {mean['parameters']:,.0f} parameters, {mean['training points']:,.0f} "
            f"training points, {args.network_seeds} seeds, {epochs} epochs on the noisy "
            f"labels, damping {mean['damping']:g}; test accuracy {mean['accuracy']:.3f}, the "
            f"network predicts the flipped label of {mean['fitted flips']:.0%} of the flipped "
            f"examples; seconds per seed (fit + self-influence): {seconds}",
            rows,
        )
    print(
        f"\ncommand: .venv/bin/python -m benchmarks.mislabel --models {','.join(models)} "
        f"--seeds {args.seeds} --network-seeds {args.network_seeds}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
    )


if __name__ == "__main__":
    main()
