"""The evidence behind compile()'s defaults: python -m benchmarks.defaults.

For three models (``--models``): the digits MLP and the digits CNN of
``benchmarks.common.digits`` in the middle of training (``--epochs``, 2 by default),
and a convex model (multinomial logistic regression on 400 digits, scikit-learn's
minimum in a float64 ``Dense(10)``, where the Gauss-Newton matrix is the Hessian),
and for each damping (``--dampings``: ``"auto"`` and numbers), it fits the Hessian
and the Gauss-Newton curvature (CG for the networks, Exact for the convex model)
and runs ``tfi.evaluation.loo_check`` (one test point, ``--points`` removals, L-BFGS
retraining of ``(1/n) sum_{k != j} L_k + Omega + (damping/2) |theta - theta_hat|^2``).

The retraining depends on the damping, not on the curvature, so for a numeric
damping it is done once, for the examples Gauss-Newton's check chooses, and the
Hessian's prediction is scored against the same retrainings (``"auto"`` chooses a
different damping for each curvature, so each gets its own check). A curvature that
is refused (``CurvatureError``: not positive definite) says so. It prints one row
per model and damping: the damping used, Pearson and Spearman of predicted against
actual loss changes for each curvature, CG's iterations, and the largest relative
difference between the two curvatures' scores (0 to rounding on the convex model).
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks.common import digits
from benchmarks.common.timing import log

MODELS = ("mlp", "cnn", "convex")
DAMPINGS = ("auto", 1e-3, 1e-2, 1e-1)
CONVEX_DAMPINGS = ("auto", 0.0, 1e-4, 1e-2, 1e-1)
CURVATURES = ("gauss_newton", "hessian")


def convex_model(data, num_train=400, c=1.0):
    """Logistic regression at scikit-learn's minimum as a float64 Keras model.

    scikit-learn minimises ``0.5 |W|^2 + C sum_j L_j``: the Keras objective
    ``mean_j L_j + l2 |W|^2`` with ``l2 = 1 / (2 C n)`` on the kernel, so its weights
    are the minimum of the objective the influence model sees.

    Returns:
        ``(model, (x_train, y_train, x_test, y_test))`` in float64.
    """
    import keras
    from sklearn.linear_model import LogisticRegression

    x_train, y_train, x_test, y_test = data
    x_train, y_train = x_train[:num_train].astype("float64"), y_train[:num_train]
    clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x_train, y_train)
    l2 = 1.0 / (2 * c * num_train)
    model = keras.Sequential(
        [
            keras.Input((64,), dtype="float64"),
            keras.layers.Dense(10, dtype="float64", kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights([clf.coef_.T, clf.intercept_])
    return model, (x_train, y_train, x_test.astype("float64"), y_test)


def _fit(model, data, curvature, damping, convex):
    """A fitted InfluenceModel, or the CurvatureError's first line."""
    import tf_influence as tfi

    x_train, y_train = data[0], data[1]
    solver = "exact" if convex else tfi.solvers.CG(tol=digits.CG_TOL, max_iter=300)
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping, curvature=curvature)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            im.fit(x_train, y_train, batch_size=256, verbose=0)
            scores = im.explain(data[2][:1], data[3][:1], verbose=0)
    except tfi.solvers.CurvatureError as error:
        return None, None, str(error).split(".")[0]
    return im, scores, None


def _correlations(predicted, actual):
    from scipy import stats

    return stats.pearsonr(predicted, actual)[0], stats.spearmanr(predicted, actual)[0]


def rows_for(name, model, data, dampings, points):
    """One dict per damping with both curvatures' agreement with leave-one-out."""
    import tf_influence as tfi

    convex = name == "convex"
    n = len(data[0])
    for damping in dampings:
        start = time.perf_counter()
        row = {"model": name, "requested": damping}
        fitted = {c: _fit(model, data, c, damping, convex) for c in CURVATURES}
        shared = None
        for curvature in CURVATURES:
            im, scores, refused = fitted[curvature]
            if im is None:
                row[curvature] = {"refused": refused}
                continue
            entry = {"damping": float(im.damping)}
            diagnostics = im.diagnostics
            if not convex:
                entry["iterations"] = diagnostics.iterations
                entry["converged"] = bool(diagnostics.all_converged)
            if shared is None or damping == "auto":
                check = tfi.evaluation.loo_check(
                    im, data[2][:1], data[3][:1], n_points=points, verbose=0
                )
                entry["pearson"], entry["spearman"] = check.pearson, check.spearman
                shared = check
            else:  # the same retrainings: they depend on the damping only
                predicted = -scores.mean(axis=0)[shared.indices] / n
                entry["pearson"], entry["spearman"] = _correlations(predicted, shared.actual)
            row[curvature] = entry
        both = [fitted[c][1] for c in CURVATURES]
        if all(s is not None for s in both):
            row["difference"] = float(
                np.abs(both[0] - both[1]).max() / max(np.abs(both[1]).max(), 1e-300)
            )
        row["seconds"] = time.perf_counter() - start
        log(f"{name} damping {damping}: {row['seconds']:.0f} s")
        yield row


def _cell(entry):
    if "refused" in entry:
        return "refused: not positive definite", ""
    used = f"{entry['damping']:.3g}"
    if "iterations" in entry:
        used += f" ({entry['iterations']} it.{'' if entry['converged'] else ', not conv.'})"
    return used, f"{entry['pearson']:.3f} / {entry['spearman']:.3f}"


def print_row(row):
    cells = []
    for curvature in CURVATURES:
        cells.extend(_cell(row[curvature]))
    difference = f"{row['difference']:.1e}" if "difference" in row else ""
    print(
        f"| {row['model']} | {row['requested']} | " + " | ".join(cells) + f" | {difference} | "
        f"{row['seconds']:.0f} |",
        flush=True,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {MODELS}")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of the networks")
    parser.add_argument("--dampings", default=None, help="'auto' and/or floats (default per model)")
    parser.add_argument("--points", type=int, default=10, help="removals per loo_check")
    args = parser.parse_args(argv)
    chosen = None
    if args.dampings:
        chosen = [d if d == "auto" else float(d) for d in args.dampings.split(",")]
    data = digits.load_data()
    print(
        f"loo_check: 1 test point, {args.points} removals; networks trained {args.epochs} "
        f"epochs, CG tol {digits.CG_TOL}, max_iter 300; convex model: Exact"
    )
    print(
        "\n| model | damping | Gauss-Newton: used | Pearson / Spearman | Hessian: used | "
        "Pearson / Spearman | max relative difference | seconds |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        if name == "convex":
            model, model_data = convex_model(data)
            dampings = chosen or CONVEX_DAMPINGS
        else:
            model, _ = digits.train_model(name, data, epochs=args.epochs)
            x_train, y_train, x_test, y_test = data
            model_data = (
                digits.inputs(name, x_train),
                y_train,
                digits.inputs(name, x_test),
                y_test,
            )
            dampings = chosen or DAMPINGS
        for row in rows_for(name, model, model_data, dampings, args.points):
            print_row(row)


if __name__ == "__main__":
    main()
