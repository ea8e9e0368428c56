"""The LDS leaderboard: python -m benchmarks.lds.

Every method's attributions on the same model, judged by the linear datamodeling
score (``tfi.evaluation.lds``) against the same retrainings, side by side in one
run, with each method's own compute time (``fit`` + ``explain``).

Models (``--models``), on scikit-learn's 8x8 digits (``benchmarks.common.digits``:
1,437 training points, the first ``--tests`` of the 360 test points):

* ``logreg``: multinomial logistic regression (a float64 ``Dense(10)``), trained
  to its minimum by scikit-learn (L-BFGS, tol 1e-10) on ``mean_j L_j + l2 |W|^2``
  with ``l2 = 1 / (2 n)``; every retraining is the same exact refit on its subset,
  so the two protocols coincide (a convex model has one minimum);
* ``mlp``: 64 -> 128 tanh -> 128 tanh -> 10, L2(1e-4) on kernels, 30 epochs of Adam
  (1e-3, batches of 32); ``cnn``: Conv2D(16) -> Conv2D(32) -> Dense(10), the same
  training. Retrained by ``tfi.evaluation.keras_trainer`` with the same settings.

Methods (``--methods``, default ``METHODS`` per model): Exact (``logreg`` only: it
forms the Hessian), CG on the Hessian and on Gauss-Newton, LiSSA (Gauss-Newton),
Arnoldi at several ranks, K-FAC and EK-FAC (``tfi.solvers.KFAC`` / ``EKFAC``; and
``ekfac_exact``, the exact expectation over output draws),
TracIn (a checkpoint every 5 epochs of the training;
``logreg`` has none) and random scores (the floor, about 0). Damping is ``"auto"``
unless the method name says otherwise (``cg_gn@0.001``).

Projected gradients (``tfi.solvers.Projected``, not in the default list), named
``projected[_<curvature>][_gauss]_<dim>[x<m>]`` (``benchmarks.lds_index.PROJECTED``)
and built with the solver's own options:

* the curvature in the projected space: none for the solver's default, the
  Gauss-Newton matrix ``P^T G P`` from one output draw per example (``fisher="true",
  samples=1``); ``exact`` for its exact sum (``samples="exact"``); ``s<m>`` for ``m``
  draws (``samples=m``); ``emp`` for TRAK's ``Phi^T Phi / n`` (``fisher="empirical"``);
* ``_gauss``: the dense Gaussian projection instead of the Kronecker one;
* ``x<m>``: an ensemble of ``m`` models trained independently with seeds ``0 ..
  m-1``, member 0 the analysed model.

So ``projected_4096`` is ``Projected(4096)`` as shipped, ``projected_exact_gauss_4096``
is ``Projected(4096, projection="gaussian", samples="exact")`` and
``projected_emp_4096x8`` an ensemble of 8 with ``fisher="empirical"``. ``fisher`` is
the full-dimensional influence with the empirical Fisher ``G^T G / n`` (see
``benchmarks.lds_index``). Each row has its Pearson correlation with
``--reference`` (CG on Gauss-Newton by default) and, for indexes (Projected,
Arnoldi), the bytes kept for queries.

Protocols (``--protocols``): ``shared`` (every subset trained from one shared
initialisation and data order: ``lds(shared_init=True)``) and ``independent``
(every retraining its own seed, as the published numbers use). Each protocol has
``--subsets`` subsets of half the training set and ``--seeds`` models per subset;
the LDS's spread is its range over those seeds (``LDSResult.per_seed``).

Retrainings are kept in ``--store-dir`` (one ``.npz`` per model and protocol), so
a stopped run goes on where it stopped, and a new method is scored without
retraining. Prints one table row per model and method, and writes
``lds_vs_time_<protocols>.png`` (LDS against compute time; ``--plot-name``),
``lds_vs_memory_<model>.png`` and ``lds_vs_ensemble_<model>.png`` to ``--plot-dir``.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.lds                          # every model, hours
    .venv/bin/python -m benchmarks.lds --models logreg,mlp --subsets 50
    .venv/bin/python -m benchmarks.lds --models mlp --subsets 50 \
        --methods cg_gn,projected_4096@0.001,arnoldi_210@0.001,projected_4096x4@0.001
"""

from __future__ import annotations

import argparse
import os
import re
import time
import warnings

import numpy as np

from benchmarks import lds_index
from benchmarks.common import digits
from benchmarks.common.report import add_plot_dir_argument, pyplot, save_figure
from benchmarks.common.timing import log

MODELS = ("logreg", "mlp", "cnn")
PROTOCOLS = ("shared", "independent")
# Per model: damping "auto" unless "@damping" says otherwise. The convex model also
# gets a small damping (its Hessian is positive definite but for the biases' shared
# shift); Exact forms the dense matrix, so only the convex model has it.
NETWORK_METHODS = (
    "cg_hessian",
    "cg_gn",
    "cg_gn@0.001",
    "lissa",
    "arnoldi_20",
    "arnoldi_100",
    "arnoldi_400",
    "kfac",
    "ekfac",
    "tracin",
    "random",
)
METHODS = {
    "logreg": (
        "exact",
        "exact@0.0001",
        "cg_hessian@0.0001",
        "cg_gn",
        "cg_gn@0.0001",
        "lissa",
        "arnoldi_20",
        "arnoldi_100",
        "arnoldi_400",
        "kfac",
        "ekfac",
        "random",
    ),
    "mlp": NETWORK_METHODS,
    "cnn": NETWORK_METHODS,
}
EPOCHS = 30
BATCH_SIZE = 32
TRACIN_EVERY = 5
# The explain batch of every method: the whole set of test points at once.
FIT_BATCH = 256


# -- models ----------------------------------------------------------------------------------
def build(name):
    """The untrained, compiled ``mlp`` or ``cnn``, initialised from Keras's current seed."""
    return digits.build_model(name, seed=None)


def build_mlp():
    return build("mlp")


def build_cnn():
    return build("cnn")


class LogisticRefit:
    """``train_fn`` of ``logreg``: scikit-learn's minimum of ``mean_j L_j + l2 |W|^2``."""

    def __init__(self, l2):
        self.l2 = l2
        self.fingerprint = f"benchmarks.lds.LogisticRefit(l2={l2!r}, tol=1e-10)"

    def __call__(self, x, y, seed):
        import keras
        from sklearn.linear_model import LogisticRegression

        del seed  # a convex model has one minimum
        c = 1.0 / (2 * self.l2 * len(x))  # sklearn: 0.5 |W|^2 + C sum_j L_j
        clf = LogisticRegression(C=c, tol=1e-10, max_iter=10000).fit(x, y)
        model = keras.Sequential(
            [
                keras.Input((x.shape[1],), dtype="float64"),
                keras.layers.Dense(
                    10, dtype="float64", kernel_regularizer=keras.regularizers.L2(self.l2)
                ),
            ]
        )
        model.layers[0].kernel.assign(clf.coef_.T)
        model.layers[0].bias.assign(clf.intercept_)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model


def setup(name, data):
    """``(model, train_fn, checkpoints, (x_train, y_train, x_test, y_test))`` of a model."""
    import keras

    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    if name == "logreg":
        x_train, x_test = x_train.astype("float64"), x_test.astype("float64")
        train_fn = LogisticRefit(1.0 / (2 * len(x_train)))
        return train_fn(x_train, y_train, 0), train_fn, None, (x_train, y_train, x_test, y_test)
    builder = build_mlp if name == "mlp" else build_cnn
    x_train, x_test = digits.inputs(name, x_train), digits.inputs(name, x_test)
    train_fn = tfi.evaluation.keras_trainer(builder, epochs=EPOCHS, batch_size=BATCH_SIZE)
    # The analysed model: the same training with seed 0, recording TracIn's checkpoints.
    checkpoints = tfi.callbacks.TracInCheckpoints(every_n_epochs=TRACIN_EVERY)
    keras.utils.set_random_seed(0)
    model = builder()
    model.fit(
        x_train,
        y_train,
        epochs=EPOCHS,
        batch_size=BATCH_SIZE,
        shuffle=True,
        verbose=0,
        callbacks=[checkpoints],
    )
    return model, train_fn, checkpoints, (x_train, y_train, x_test, y_test)


# -- methods ---------------------------------------------------------------------------------
# Method names besides arnoldi_<rank> and the projected ones (lds_index.PROJECTED).
NAMED = (
    "exact",
    "exact_hessian",
    "cg_hessian",
    "cg_gn",
    "lissa",
    "kfac",
    "ekfac",
    "ekfac_exact",
    "fisher",
    "tracin",
    "random",
)


def unknown(methods):
    """The names in ``methods`` that are no method (``name`` or ``name@damping``)."""
    bad = []
    for method in methods:
        base, at, damping = method.partition("@")
        known = (
            base in NAMED
            or re.fullmatch(r"arnoldi_\d+", base) is not None
            or lds_index.projected_settings(base) is not None
        )
        if at:
            try:
                float(damping)
            except ValueError:
                known = False
        if not known:
            bad.append(method)
    return bad


def settings(method, num_params):
    """``(solver, damping, curvature)`` of an influence method, or None if it does not apply.

    ``method`` is a name of ``METHODS``, optionally with ``@damping`` (a number).
    """
    import tf_influence as tfi

    method, _, damping = method.partition("@")
    damping = float(damping) if damping else "auto"
    projected = lds_index.projected_settings(method)
    if projected is not None:
        options, members = projected
        if members is not None:
            return None  # an ensemble needs its members (see `attributions`)
        return tfi.solvers.Projected(**options), damping, "gauss_newton"
    if method.startswith("arnoldi_"):
        rank = int(method.split("_")[1])
        if rank >= num_params:
            return None
        return tfi.solvers.Arnoldi(rank=rank), damping, "gauss_newton"
    found = {
        "exact": ("exact", "gauss_newton"),
        "exact_hessian": ("exact", "hessian"),
        "cg_hessian": (tfi.solvers.CG(), "hessian"),
        "cg_gn": (tfi.solvers.CG(), "gauss_newton"),
        "lissa": (tfi.solvers.LiSSA(), "gauss_newton"),
        "kfac": (tfi.solvers.KFAC(), "gauss_newton"),
        "ekfac": (tfi.solvers.EKFAC(), "gauss_newton"),
        "ekfac_exact": (tfi.solvers.EKFAC(samples="exact"), "gauss_newton"),
    }.get(method)
    return None if found is None else (found[0], damping, found[1])


def attributions(name, method, model, checkpoints, data):
    """``(scores (n_test, n_train), seconds, note, (index bytes, dim) or None)``, or None
    if ``method`` does not apply."""
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    start = time.perf_counter()
    if method == "random":
        scores = np.random.default_rng(0).normal(size=(len(x_test), len(x_train)))
        return scores, 0.0, "", None
    if method == "tracin":
        if checkpoints is None:
            return None
        tracin = tfi.TracIn(model, checkpoints).fit(x_train, y_train, batch_size=FIT_BATCH)
        scores = tracin.explain(x_test, y_test, verbose=0)
        return scores, time.perf_counter() - start, f"{tracin.num_checkpoints} checkpoints", None
    if method.startswith("exact") and name != "logreg":
        return None  # the dense Hessian of a network does not fit in memory
    base, _, damping = method.partition("@")
    damping = float(damping) if damping else "auto"
    if base == "fisher":
        scores, damping = lds_index.fisher_scores(model, data, damping, FIT_BATCH)
        return scores, time.perf_counter() - start, f"damping {damping:.3g}", None
    projected = lds_index.projected_settings(base)
    note = ""
    if projected is not None and projected[1] is not None:
        if name == "logreg":
            return None  # a convex model has one minimum: every member is the same
        options, count = projected
        trained = time.perf_counter()
        members = ensemble(name, model, x_train, y_train, count)
        trained = time.perf_counter() - trained
        start += trained  # training the members is not the method's compute
        note = f", {count} members ({trained:.0f} s training them, not counted)"
        found = (tfi.solvers.Projected(**options, checkpoints=members), damping, "gauss_newton")
    else:
        found = settings(method, model.count_params())
    if found is None:
        return None
    solver, damping, curvature = found
    im = tfi.InfluenceModel(model)
    im.compile(solver=solver, damping=damping, curvature=curvature)
    try:
        im.fit(x_train, y_train, batch_size=FIT_BATCH, verbose=0)
        scores, used = im.explain(x_test, y_test, verbose=0), float(im.damping)
    except tfi.solvers.CurvatureError as error:
        return None, time.perf_counter() - start, str(error).split(".")[0][:100], None
    seconds = time.perf_counter() - start
    if projected is not None:
        projection = im.state.index_inverse.projection
        note = f", dim {projection.dim // projection.members}" + note
    return scores, seconds, f"damping {used:.3g}" + note, lds_index.index_size(im)


# -- projected gradients ---------------------------------------------------------------------
MEMBERS = {}  # (model name, seed) -> a model trained as the analysed one, with that seed


def ensemble(name, model, x_train, y_train, count):
    """The analysed model and ``count - 1`` more trained the same way with seeds 1, 2, ..."""
    import keras

    members = [model]
    for seed in range(1, count):
        if (name, seed) not in MEMBERS:
            keras.utils.set_random_seed(seed)
            member = build(name)
            member.fit(
                x_train, y_train, epochs=EPOCHS, batch_size=BATCH_SIZE, shuffle=True, verbose=0
            )
            MEMBERS[name, seed] = member
        members.append(MEMBERS[name, seed])
    return members


# -- the run ---------------------------------------------------------------------------------
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument(
        "--methods", default="", help="comma-separated, for every model (default: METHODS)"
    )
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--subsets", type=int, default=100, help="subsets per protocol")
    parser.add_argument("--seeds", type=int, default=2, help="models trained per subset")
    parser.add_argument("--tests", type=int, default=100, help="test points")
    parser.add_argument("--store-dir", default="lds_runs", help="where retrainings are kept")
    parser.add_argument(
        "--reference",
        default="cg_gn",
        help="the method every method's Pearson correlation is taken with ('' for none)",
    )
    add_plot_dir_argument(parser)
    parser.add_argument(
        "--plot-name",
        default="",
        help="file name of the plot (default lds_vs_time_<protocols>.png)",
    )
    args = parser.parse_args(argv)
    bad = unknown([m for m in [*args.methods.split(","), args.reference] if m])
    if bad:
        parser.error(
            f"--methods / --reference name no method. Received: {','.join(bad)}. Use the "
            f"names {', '.join(NAMED)}, arnoldi_<rank> or {lds_index.PROJECTED_NAMES}, "
            "each optionally @<damping>."
        )
    import tf_influence as tfi

    warnings.simplefilter("ignore", UserWarning)
    os.makedirs(args.store_dir, exist_ok=True)
    data = digits.load_data()
    data = (data[0], data[1], data[2][: args.tests], data[3][: args.tests])
    start_all = time.perf_counter()
    points = []
    protocols = [p for p in args.protocols.split(",") if p]
    header = " | ".join(f"LDS {p} (seeds' range)" for p in protocols)
    print(f"\n| model | method | {header} | Pearson | index | seconds | note |")
    print("| --- | --- | " + " | ".join("---" for _ in protocols) + " | --- | --- | --- | --- |")
    for name in [m for m in args.models.split(",") if m]:
        log(f"{name}: training the analysed model")
        model, train_fn, checkpoints, model_data = setup(name, data)
        retrain_seconds = {}
        methods = [m for m in args.methods.split(",") if m] or METHODS[name]
        reference = None
        if args.reference:
            log(f"{name}: {args.reference} (the reference)")
            kept = attributions(name, args.reference, model, checkpoints, model_data)
            reference = None if kept is None else kept[0]
        for method in methods:
            log(f"{name}: {method}")
            if reference is not None and method == args.reference:
                found = kept
            else:
                found = attributions(name, method, model, checkpoints, model_data)
            if found is None:
                continue
            scores, seconds, note, index = found
            cells = []
            for protocol in protocols:
                if scores is None:
                    cells.append("refused")
                    continue
                store = os.path.join(
                    args.store_dir, f"{name}_{protocol}_{args.subsets}x{args.seeds}.npz"
                )
                result = tfi.evaluation.lds(
                    scores,
                    *model_data,
                    train_fn,
                    num_subsets=args.subsets,
                    seeds_per_subset=args.seeds,
                    shared_init=protocol == "shared",
                    store=store,
                    verbose=0,
                )
                retrain_seconds[protocol] = retrain_seconds.get(protocol, 0.0) + result.seconds
                spread = f" ({result.per_seed.min():.2f}-{result.per_seed.max():.2f})"
                cells.append(f"{result.score:.3f}" + (spread if args.seeds > 1 else ""))
                points.append((name, method, protocol, seconds, result.score, index))
            pearson = ""
            if scores is not None and reference is not None:
                pearson = f"{np.corrcoef(scores.ravel(), reference.ravel())[0, 1]:.3f}"
            size = "" if index is None else f"{index[0] / 2**20:.2f} MiB"
            print(
                f"| {name} | {method} | {' | '.join(cells)} | {pearson} | {size} | "
                f"{seconds:.1f} | {note} |",
                flush=True,
            )
        log(f"{name}: retraining took {retrain_seconds} s in this run")
    print(f"\nwhole run: {time.perf_counter() - start_all:.0f} s")
    plot(points, args.plot_dir, args.plot_name)
    lds_index.plot_memory(points, args.plot_dir)
    lds_index.plot_ensembles(points, args.plot_dir)


def plot(points, plot_dir, filename=""):
    if not points:
        return
    plt = pyplot()
    protocols = sorted({p[2] for p in points})
    figure, axes = plt.subplots(1, len(protocols), figsize=(5.5 * len(protocols), 4), squeeze=False)
    markers = {"logreg": "o", "mlp": "s", "cnn": "^"}
    for ax, protocol in zip(axes[0], protocols, strict=True):
        for name, method, p, seconds, score, _ in points:
            if p != protocol or method == "random":
                continue
            ax.scatter(max(seconds, 0.05), score, marker=markers.get(name, "o"))
            ax.annotate(f"{name} {method}", (max(seconds, 0.05), score), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("compute time of the method, s (fit + explain)")
        ax.set_ylabel("LDS")
        ax.set_title(f"{protocol} protocol")
        ax.axhline(0.0, color="grey", linewidth=0.5)
    save_figure(figure, plot_dir, filename or f"lds_vs_time_{'_'.join(protocols)}.png")


if __name__ == "__main__":
    main()
