"""The solver protocol: a solver written here plugs in through it alone.

``EigenSolver`` (test-only) inverts the dense curvature by its eigendecomposition
and exposes the result through the protocol's hooks: ``prepare`` with a progress
bar, ``low_rank`` (so the fitted state builds the influence index, ``export``
serves it and self-influence comes from it), and ``get_state`` / ``set_state``
(so ``save`` / ``load`` keep the eigenpairs). Nothing in the package names it:
it is registered with ``tfi.solvers.register`` and every answer is checked
against ``Exact``.
"""

import json
import pathlib
import re
import tokenize

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import make_mlp

import tf_influence as tfi
from tf_influence.solvers import Diagnostics, LowRankInverse, Solver

PACKAGE = pathlib.Path(tfi.__file__).parent
DAMPING = 0.3


class EigenSolver(Solver):
    """``inv(C) = V diag(1/lambda) V^T`` from the dense matrix's eigendecomposition."""

    name = "eigen"
    decompositions = 0  # how often the eigendecomposition ran (class-wide, for the tests)

    def __init__(self, shift: float = 0.0):
        self.shift = float(shift)

    def get_config(self):
        return {"shift": self.shift}

    def _pairs(self, operator):
        def make():
            EigenSolver.decompositions += 1
            values, vectors = tf.linalg.eigh(operator.dense())
            return values + self.shift, tf.cast(vectors, operator.dtype)

        return operator.cached(("eigen", self.shift), make)

    def prepare(self, operator, progress=None):
        bar = progress(1, "Eigendecomposition")
        self._pairs(operator)
        bar.update(1)
        bar.done()

    def solve(self, operator, rhs):
        low = self.low_rank(operator)
        coefficients = tf.matmul(low.basis, rhs, transpose_a=True) * low.inverse_values[:, None]
        solution = tf.matmul(low.basis, coefficients)
        zeros = np.zeros(int(rhs.shape[1]))
        return solution, Diagnostics(self.name, 0, zeros, zeros == 0)

    def low_rank(self, operator):
        values, vectors = self._pairs(operator)
        return LowRankInverse(vectors, tf.cast(1.0 / values, operator.dtype))

    def get_state(self, operator):
        values, vectors = self._pairs(operator)
        return {"values": values.numpy(), "vectors": vectors.numpy()}

    def set_state(self, operator, arrays):
        pair = (tf.constant(arrays["values"]), tf.constant(arrays["vectors"]))
        operator.cached(("eigen", self.shift), lambda: pair)


tfi.solvers.register("eigen", EigenSolver)


def fitted(blobs, solver):
    x, y = blobs
    model = make_mlp()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=DAMPING)
    return im.fit(x, y, verbose=0)


@pytest.fixture
def pair(blobs):
    return fitted(blobs, "eigen"), fitted(blobs, "exact")


def test_registered_solver_agrees_with_exact(pair, blobs):
    ours, exact = pair
    x, y = blobs
    assert isinstance(ours.solver, EigenSolver)
    assert ours.state.index.shape == (len(x), ours.num_params)  # the index came from low_rank
    np.testing.assert_allclose(
        ours.explain(x[:7], y[:7], verbose=0), exact.explain(x[:7], y[:7], verbose=0), atol=1e-9
    )
    np.testing.assert_allclose(
        ours.self_influence(verbose=0), exact.self_influence(verbose=0), rtol=1e-8
    )
    top = ours.top_k(x[:3], y[:3], k=4, verbose=0)
    dense = exact.explain(x[:3], y[:3], verbose=0)
    np.testing.assert_array_equal(top.harmful_indices, np.argsort(-dense, axis=1)[:, :4])


def test_state_hooks_carry_save_and_load(pair, blobs, tmp_path):
    ours, _ = pair
    x, y = blobs
    expected = ours.explain(x[:5], y[:5], verbose=0)
    path = tmp_path / "state.npz"
    ours.save(path, include_data=True)
    before = EigenSolver.decompositions
    loaded = tfi.InfluenceModel.load(path, ours.model, verbose=0)
    assert EigenSolver.decompositions == before  # set_state restored the eigenpairs
    assert loaded.get_compile_config() == ours.get_compile_config()
    np.testing.assert_allclose(loaded.explain(x[:5], y[:5], verbose=0), expected, atol=1e-12)


def test_low_rank_hook_enables_export(pair, blobs, tmp_path):
    ours, exact = pair
    x, y = blobs
    path = tmp_path / "served" / "1"
    ours.export(path, top_k=3, include_scores=True)
    loaded = tf.saved_model.load(str(path))
    signature = loaded.signatures["explain"]
    name = next(k for k in signature.structured_input_signature[1] if k != "labels")
    served = signature(**{name: tf.constant(x[:4]), "labels": tf.constant(y[:4], tf.int32)})
    np.testing.assert_allclose(
        served["scores"].numpy(), exact.explain(x[:4], y[:4], verbose=0), atol=1e-9
    )
    with open(path / "assets.extra" / "compile_config.json") as handle:
        assert json.load(handle) == ours.get_compile_config()


def test_compile_config_round_trip(pair, blobs):
    ours, exact = pair
    config = ours.get_compile_config()
    assert config == {
        "solver": {"class_name": "EigenSolver", "config": {"shift": 0.0}},
        "damping": DAMPING,
        "hvp": "auto",
        "scoring": "auto",
        "jit_compile": False,
    }
    other = tfi.InfluenceModel(exact.model)
    other.compile_from_config(config)
    assert isinstance(other.solver, EigenSolver) and other.damping == DAMPING
    with pytest.raises(ValueError, match="unknown keys"):
        other.compile_from_config({**config, "dampng": 1.0})


class PlainEigenSolver(EigenSolver):
    """The same inverse without the low-rank hook: scores and self-influence by solves."""

    def solve(self, operator, rhs):
        values, vectors = self._pairs(operator)
        solution = vectors @ (tf.transpose(vectors) @ rhs / values[:, None])
        zeros = np.zeros(int(rhs.shape[1]))
        return solution, Diagnostics(self.name, 0, zeros, zeros == 0)

    def low_rank(self, operator):
        return None


def test_default_self_products_solve_when_a_solver_has_no_shortcut(blobs):
    im = fitted(blobs, PlainEigenSolver())
    exact = fitted(blobs, "exact")
    assert im.state.index is None
    np.testing.assert_allclose(
        im.self_influence(verbose=0), exact.self_influence(verbose=0), rtol=1e-8
    )


def test_register_refuses_bad_input():
    with pytest.raises(ValueError, match="lower-case identifier"):
        tfi.solvers.register("Not A Name", EigenSolver)
    with pytest.raises(ValueError, match="subclass of tf_influence.solvers.Solver"):
        tfi.solvers.register("thing", object)
    with pytest.raises(ValueError, match="already registered"):
        tfi.solvers.register("cg", EigenSolver)
    assert tfi.solvers.register("eigen", EigenSolver) is EigenSolver  # idempotent


def _code(path) -> str:
    """The file's code without comments and string literals (docstrings name solvers)."""
    with open(path, "rb") as handle:
        tokens = tokenize.tokenize(handle.readline)
        kept = [t.string for t in tokens if t.type in (tokenize.NAME, tokenize.OP)]
    return " ".join(kept).replace(" . ", ".").replace(" ( ", "(").replace(" , ", ",")


def test_front_door_and_features_never_name_a_solver_class():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "solvers" or path.name == "experiments.py":
            continue
        code = _code(path)
        assert not re.search(r"isinstance\([\w.]*solver,", code), path
        assert not re.search(r"\b(Exact|Arnoldi|LiSSA|CG)\b", code), path
    assert "exact.cholesky" not in "".join(
        p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "exact.py"
    )


def test_no_module_reaches_into_influence_model_privates():
    pattern = re.compile(r"\b(im|self\.im|influence_model|self\._im)\._[a-z]")
    for path in PACKAGE.rglob("*.py"):
        if path.name == "influence_model.py":
            continue
        assert not pattern.search(path.read_text()), path
