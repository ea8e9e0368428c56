"""Curvature and damping side by side: python -m benchmarks.damping [--loo] [--products].

For the digits MLP (``benchmarks.common.digits``; trained for each number of
epochs in ``--epochs``, so both a converged and a mid-training model) and for
each curvature (Hessian, Gauss-Newton) and damping (``"auto"`` and fixed values),
it fits CG and explains ``NUM_TESTS`` test points, and prints the damping used,
CG's iterations, whether every solve converged, the seconds, and the Pearson
correlation of the scores with those of the same curvature at the smallest fixed
damping that converged. With ``--loo`` it also runs ``tfi.evaluation.loo_check``
on a convex model (multinomial logistic regression on the digits, float64),
where the Gauss-Newton matrix equals the Hessian, for each damping. With
``--products`` it only times one product of each curvature with 1 and 16 vectors.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from benchmarks.common import digits

DAMPINGS = ("auto", 1e-3, 1e-2, 1e-1)
CURVATURES = ("hessian", "gauss_newton")
NUM_TESTS = 5


def _explain(model, data, curvature, damping):
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    im = tfi.InfluenceModel(model)
    im.compile(
        solver=tfi.solvers.CG(tol=digits.CG_TOL, max_iter=300), damping=damping, curvature=curvature
    )
    start = time.perf_counter()
    row = {"curvature": curvature, "requested": damping}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            im.fit(x_train, y_train, batch_size=256, verbose=0)
            row["scores"] = im.explain(x_test[:NUM_TESTS], y_test[:NUM_TESTS], verbose=0)
        diagnostics = im.diagnostics
        row.update(
            damping=im.damping,
            iterations=diagnostics.iterations,
            converged=diagnostics.all_converged,
        )
    except ValueError as error:  # CurvatureError: negative curvature met
        row.update(damping=im.damping, iterations=None, converged=False, error=str(error)[:60])
    row["seconds"] = time.perf_counter() - start
    return row


def _table(rows):
    reference = {}
    for row in rows:
        if row.get("converged") and row["requested"] != "auto":
            reference.setdefault(row["curvature"], row["scores"])
    print(
        f"{'curvature':<13} {'damping':>9} {'used':>10} {'CG it.':>7} {'conv.':>6} "
        f"{'seconds':>8} {'pearson':>8}"
    )
    for row in rows:
        base = reference.get(row["curvature"])
        pearson = ""
        if base is not None and "scores" in row:
            pearson = f"{np.corrcoef(row['scores'].ravel(), base.ravel())[0, 1]:.4f}"
        used = "-" if row["damping"] == "auto" else f"{float(row['damping']):.3g}"
        print(
            f"{row['curvature']:<13} {str(row['requested']):>9} {used:>10} "
            f"{str(row['iterations']):>7} {str(row['converged']):>6} "
            f"{row['seconds']:8.1f} {pearson:>8}"
        )


def _loo(data):
    import keras

    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    x_train, x_test = x_train[:400].astype("float64"), x_test.astype("float64")
    y_train = y_train[:400]
    from sklearn.linear_model import LogisticRegression

    # scikit-learn minimises 0.5 |W|^2 + C sum_j L_j: the Keras objective mean_j L_j +
    # l2 |W|^2 with l2 = 1 / (2 C n) on the kernel, so its weights are the minimum.
    c = 1.0
    clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x_train, y_train)
    l2 = 1.0 / (2 * c * len(x_train))
    model = keras.Sequential(
        [
            keras.Input((64,), dtype="float64"),
            keras.layers.Dense(10, dtype="float64", kernel_regularizer=keras.regularizers.L2(l2)),
        ]
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.set_weights([clf.coef_.T, clf.intercept_])
    print(f"{'curvature':<13} {'damping':>9} {'used':>10} {'pearson':>8} {'spearman':>8}")
    for curvature in CURVATURES:
        for damping in ("auto", 0.0, 1e-4, 1e-2, 1e-1):
            im = tfi.InfluenceModel(model)
            im.compile(solver="exact", damping=damping, curvature=curvature)
            try:
                im.fit(x_train, y_train, verbose=0)
            except tfi.solvers.CurvatureError:  # the softmax's bias sum has no curvature
                print(f"{curvature:<13} {str(damping):>9}  refused: not positive definite")
                continue
            check = tfi.evaluation.loo_check(im, x_test[:1], y_test[:1], n_points=10, verbose=0)
            print(
                f"{curvature:<13} {str(damping):>9} {im.damping:10.3g} "
                f"{check.pearson:8.4f} {check.spearman:8.4f}"
            )


def _products(model, data, repeats=3):
    """Seconds per product over the training set, 1 and 16 vectors, for each curvature."""
    import tensorflow as tf

    from tf_influence.engine import ExampleData, Objective
    from tf_influence.engine.curvature import make_operator

    objective = Objective(model)
    examples = ExampleData(data[0], data[1], 256)
    for curvature in CURVATURES:
        operator = make_operator(curvature, objective, examples)
        for k in (1, 16):
            vectors = tf.random.stateless_normal([operator.num_params, k], [0, k])
            operator.matvec(vectors)  # traced
            start = time.perf_counter()
            for _ in range(repeats):
                operator.matvec(vectors).numpy()
            seconds = (time.perf_counter() - start) / repeats
            print(f"{curvature:<13} {k:>3} vectors: {seconds:.3f} s per product")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", default="30,2", help="training epochs, comma-separated")
    parser.add_argument("--loo", action="store_true", help="also run loo_check on a convex model")
    parser.add_argument("--products", action="store_true", help="only time one product")
    parser.add_argument(
        "--dampings", default=",".join(map(str, DAMPINGS)), help="'auto' and/or floats"
    )
    args = parser.parse_args(argv)
    dampings = [d if d == "auto" else float(d) for d in args.dampings.split(",")]
    data = digits.load_data()
    for epochs in [int(e) for e in args.epochs.split(",") if e]:
        model, accuracy = digits.train_model("mlp", data, epochs=epochs)
        if args.products:
            print(f"\ndigits MLP, {epochs} epochs, batch size 256")
            _products(model, data)
            continue
        print(
            f"\ndigits MLP, {epochs} epochs (test accuracy {accuracy:.3f}), "
            f"{model.count_params()} parameters, CG tol {digits.CG_TOL}, max_iter 300"
        )
        rows = [_explain(model, data, c, d) for c in CURVATURES for d in dampings]
        _table(rows)
    if args.loo:
        print("\nconvex model: logistic regression on 400 digits (float64), loo_check")
        _loo(data)


if __name__ == "__main__":
    main()
