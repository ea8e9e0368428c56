"""Property-based checks (hypothesis): random small problems, no crash, invariants hold.

Shapes, dtypes, batch sizes, label encodings and sizes down to one training or
test example are drawn at random (derandomised: the same examples on every run).
For each: the scores are finite and shaped (n_test, n_train); they do not depend
on the batch size; self-influence is minus the diagonal of explaining the
training set; CG agrees with Exact.
"""

import keras
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tf_influence as tfi

DAMPING = 5.0  # keeps H + damping*I positive definite for any random tiny network
ENCODINGS = ("sparse", "sparse_column", "one_hot", "binary")

problems = st.fixed_dictionaries(
    {
        "n_train": st.integers(1, 12),
        "n_test": st.integers(1, 4),
        "num_inputs": st.integers(1, 4),
        "hidden": st.integers(1, 4),
        "num_classes": st.integers(2, 4),
        "dtype": st.sampled_from(["float32", "float64"]),
        "encoding": st.sampled_from(ENCODINGS),
        "batch_size": st.integers(1, 14),
        "seed": st.integers(0, 2**16),
    }
)


def _build(p):
    rng = np.random.default_rng(p["seed"])
    n = p["n_train"] + p["n_test"]
    x = rng.normal(size=(n, p["num_inputs"])).astype(p["dtype"])
    classes = 1 if p["encoding"] == "binary" else p["num_classes"]
    labels = rng.integers(0, 2 if classes == 1 else classes, size=n)
    if p["encoding"] == "sparse":
        y, loss = labels, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif p["encoding"] == "sparse_column":
        y, loss = labels[:, None], keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    elif p["encoding"] == "one_hot":
        y = np.eye(classes, dtype=p["dtype"])[labels]
        loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    else:
        y, loss = labels[:, None].astype(p["dtype"]), keras.losses.BinaryCrossentropy(True)
    keras.utils.set_random_seed(p["seed"])
    model = keras.Sequential(
        [
            keras.Input((p["num_inputs"],), dtype=p["dtype"]),
            keras.layers.Dense(p["hidden"], activation="tanh", dtype=p["dtype"]),
            keras.layers.Dense(classes, dtype=p["dtype"]),
        ]
    )
    model.compile(loss=loss)
    train = (x[: p["n_train"]], y[: p["n_train"]])
    test = (x[p["n_train"] :], y[p["n_train"] :])
    return model, train, test


def _fit(model, train, solver, batch_size):
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=DAMPING)
    return im.fit(*train, batch_size=batch_size, verbose=0)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(problems)
def test_random_problems_keep_the_invariants(p):
    model, train, test = _build(p)
    rtol = 1e-4 if p["dtype"] == "float32" else 1e-9
    exact = _fit(model, train, "exact", p["batch_size"])
    scores = exact.explain(*test, verbose=0)
    assert scores.shape == (p["n_test"], p["n_train"])
    assert scores.dtype == np.dtype(p["dtype"])
    assert np.all(np.isfinite(scores))
    scale = max(float(np.max(np.abs(scores))), 1e-30)

    # Batch-size invariance: one batch of everything gives the same scores.
    whole = _fit(model, train, "exact", p["n_train"]).explain(*test, verbose=0)
    np.testing.assert_allclose(whole, scores, atol=rtol * scale)

    # Self-influence is minus the diagonal of explaining the training set.
    self_influence = exact.self_influence(verbose=0)
    diagonal = -np.diag(exact.explain(*train, verbose=0))
    np.testing.assert_allclose(
        self_influence, diagonal, atol=rtol * max(float(np.abs(diagonal).max()), 1e-30)
    )
    assert np.all(self_influence >= -rtol * max(float(np.abs(diagonal).max()), 1e-30))

    # CG (block CG, tight tolerance) agrees with Exact.
    cg = _fit(model, train, tfi.solvers.CG(tol=1e-10), p["batch_size"])
    np.testing.assert_allclose(cg.explain(*test, verbose=0), scores, atol=100 * rtol * scale)
