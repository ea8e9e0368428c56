"""When can I trust the numbers? ``loo_check`` on a convex and on a deep model.

For each model, ``tfi.evaluation.loo_check`` removes 20 training examples one at a
time (the 10 with the largest predicted change of the test loss, 10 at random),
retrains, and reports the Pearson and Spearman correlations of the predicted and
actual changes, for the 3 test points with the highest loss.

* convex: L2 logistic regression on breast cancer (scikit-learn, C=0.1, 300
  training points, float64), at its exact minimum, ``Exact`` solver, damping 0;
  retrained by the default warm-started L-BFGS (equal to scikit-learn refitting).
* deep: a tanh MLP 64 -> 32 -> 10 on digits (1,437 training points, L2 2^-10),
  trained by Adam in float32 and analysed in float64, ``CG`` with damping 1e-2;
  retrained (a) by the default L-BFGS on the damped objective the influence
  describes, and (b) by 30 epochs of Adam from the trained weights without the
  example (``retrain=``), as a Keras user would.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.trust      # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

COMMAND = ".venv/bin/python -m benchmarks.trust"


def convex():
    import keras
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    import tf_influence as tfi

    x, y = load_breast_cancer(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_test, y_test, x, y = x[:20], y[:20], x[20:320], y[20:320]
    clf = LogisticRegression(C=0.1, tol=1e-12, max_iter=10000).fit(x, y)
    model = keras.Sequential(
        [
            keras.Input((30,), dtype="float64"),
            keras.layers.Dense(
                1, dtype="float64", kernel_regularizer=keras.regularizers.L2(1 / (2 * 0.1 * 300))
            ),
        ]
    )
    model.set_weights([clf.coef_.T, clf.intercept_])
    model.compile(loss=keras.losses.BinaryCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile("exact", damping=0.0)
    im.fit(x, y.astype("float64")[:, None], verbose=0)
    z = x_test @ clf.coef_.ravel() + clf.intercept_[0]
    worst = np.argsort(-(np.logaddexp(0, z) - y_test * z))[:3]
    rows = []
    for index in worst:
        check = tfi.evaluation.loo_check(
            im,
            x_test[index : index + 1],
            y_test[index : index + 1, None].astype("float64"),
            n_points=20,
            verbose=0,
        )
        rows.append(("convex: logistic regression, L-BFGS retraining", index, check))
    return rows


def deep():
    import keras
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    import tf_influence as tfi

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    reg = keras.regularizers.L2(2**-10)  # exact in float32, as Keras stores it

    def build(dtype):
        return keras.Sequential(
            [
                keras.Input((64,), dtype=dtype),
                keras.layers.Dense(32, activation="tanh", kernel_regularizer=reg, dtype=dtype),
                keras.layers.Dense(10, kernel_regularizer=reg, dtype=dtype),
            ]
        )

    # Trained in float32 (Keras keeps regularisation factors in float32), analysed
    # and retrained in float64.
    keras.utils.set_random_seed(0)
    trained = build("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    trained.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss)
    trained.fit(x_train, y_train, epochs=60, batch_size=128, verbose=0, shuffle=False)
    model = build("float64")
    model.set_weights([w.astype("float64") for w in trained.get_weights()])
    model.compile(loss=loss)
    im = tfi.InfluenceModel(model)
    im.compile("cg", damping=1e-2)
    im.fit(x_train, y_train, batch_size=256, verbose=0)
    losses = im.objective.per_example_loss(x_test, y_test).numpy()
    worst = np.argsort(-losses)[:3]

    def adam_retrain(model, x, y):
        trained.set_weights([w.astype("float32") for w in model.get_weights()])
        trained.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        trained.fit(x, y, epochs=30, batch_size=128, verbose=0, shuffle=False)
        model.set_weights([w.astype("float64") for w in trained.get_weights()])

    rows = []
    for index in worst:
        test = (x_test[index : index + 1], y_test[index : index + 1])
        check = tfi.evaluation.loo_check(im, *test, n_points=20, verbose=0)
        rows.append(("deep: MLP, L-BFGS retraining of the damped objective", index, check))
    for index in worst:
        test = (x_test[index : index + 1], y_test[index : index + 1])
        check = tfi.evaluation.loo_check(im, *test, n_points=20, retrain=adam_retrain, verbose=0)
        rows.append(("deep: MLP, 30 epochs of Adam (retrain=)", index, check))
    return rows


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    warnings.simplefilter("ignore")
    start = time.perf_counter()
    rows = convex() + deep()
    print(f"# loo_check: predicted vs actual leave-one-out change (`{COMMAND}`)\n")
    print("| model and retraining | test point | Pearson | Spearman | retraining (s) |")
    print("|---|---|---|---|---|")
    for name, index, check in rows:
        print(
            f"| {name} | {index} | {check.pearson:.3f} | {check.spearman:.3f} | "
            f"{check.seconds:.1f} |"
        )
    print(f"\nTotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
