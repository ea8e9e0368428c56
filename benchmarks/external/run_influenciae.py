"""Influence of the digits workload with Deel's ``influenciae`` (TF 2.15 / Keras 2).

Run with the influenciae venv (see setup_envs.sh)::

    /tmp/bench-influenciae/bin/python -m benchmarks.external.run_influenciae \
        --workload /tmp/bench/workload.npz --out /tmp/bench/results

What influenciae computes (``FirstOrderInfluenceCalculator``,
``estimate_influence_values_in_batches``): ``grad L(z_test)^T H^-1 grad L(z_j)``
with ``H`` the mean Hessian of the per-example loss it is given, inverted with
``tf.linalg.pinv`` ("exact") or solved by its CG (``"cgd"``). That is ``-1`` times
our score: ``factor = -1``, no ``1/n``.

Regularisation and damping: influenciae has neither (its loss is only the
reduction-less loss function; ``model.losses`` are ignored and the exact solver
takes a pseudo-inverse, without damping). We give it our objective's curvature
through the loss function: every per-example loss gets the term
``0.5 * sum_k c_k (theta_k - theta_hat_k)^2`` with ``c = 2*l2 + damping`` on
kernel entries and ``c = damping`` on bias entries (``theta_hat``: the trained
weights, a constant). Its gradient at ``theta_hat`` is exactly zero, so the
per-example gradients are unchanged, and its Hessian is exactly the L2 Hessian
plus ``damping * I``; averaged over the training set it is added once. So the
Hessian influenciae inverts is exactly our ``H``.

Batch size: 8, not the workload's 128 (see INFLUENCIAE_BATCH_SIZE): influenciae's
exact Hessian needs memory quadratic in the batch size.

CG cost: influenciae solves one CG system per *training* point (and runs each
Hessian-vector product example by example with ``tf.map_fn``), so 1437 solves
would take hours. Its CG runs are capped to a few training columns spread evenly
over the training set (``--cg-columns-a 24:4``: 24 columns, solved 4 per batch;
``--cg-columns-b 4:1``). The training batches are solved lazily, one at a time, so
each is timed: the first also traces the graphs, the later ones give the steady
cost per batch, and the time for all 1437 columns is estimated as
``(total - steady * batches) + steady * 1437 / per_batch``. The Pearson
correlation uses the columns computed.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np

from benchmarks.external.common import Results, Timer, Workload, parse_args, selected

INFLUENCIAE_BATCH_SIZE = 8


def build_model(tf, work):
    reg = tf.keras.regularizers.L2(work.l2)
    model = tf.keras.Sequential(
        [
            tf.keras.Input((64,)),
            tf.keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg, name="dense_1"),
            tf.keras.layers.Dense(128, activation="tanh", kernel_regularizer=reg, name="dense_2"),
            tf.keras.layers.Dense(10, kernel_regularizer=reg, name="logits"),
        ]
    )
    for layer in model.layers:
        layer.set_weights(list(work.weights[layer.name]))
    return model


def make_loss(tf, variables, l2, damping):
    """Cross-entropy per example plus a zero-gradient quadratic carrying L2 + damping."""
    base = tf.keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf.keras.losses.Reduction.NONE
    )
    anchors = [tf.constant(v.numpy()) for v in variables]
    coefs = [(2.0 * l2 + damping) if "kernel" in v.name else damping for v in variables]

    def loss(y_true, y_pred, sample_weight=None):
        per_example = base(y_true, y_pred, sample_weight)
        curvature = tf.add_n(
            [
                0.5 * c * tf.reduce_sum(tf.square(v - a))
                for v, a, c in zip(variables, anchors, coefs, strict=True)
            ]
        )
        return per_example + curvature

    return loss


def scores_matrix(calculator, test_ds, train_ds, timed=False):
    """Assembles the (n_test, n_train_columns) matrix from influenciae's nested datasets.

    The inner datasets are lazy: each training batch is solved when it is read, so
    with ``timed=True`` the seconds of each training batch are returned too.
    """
    rows, seconds = [], []
    for _, per_train in calculator.estimate_influence_values_in_batches(test_ds, train_ds):
        blocks = []
        start = time.perf_counter()
        for _, values in per_train:
            blocks.append(values.numpy())
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
        rows.append(np.concatenate(blocks, axis=1))
    scores = np.concatenate(rows, axis=0)
    return (scores, seconds) if timed else scores


def main(argv=None):
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            (("--cg-columns-a",), {"default": "24:4", "help": "A-cg: columns:per_batch"}),
            (("--cg-columns-b",), {"default": "4:1", "help": "B-cg: columns:per_batch"}),
        ],
    )
    work = Workload(args.workload)
    try:
        import tensorflow as tf
        from deel.influenciae.common import InfluenceModel
        from deel.influenciae.influence import FirstOrderInfluenceCalculator
    except ImportError as error:  # pragma: no cover - depends on the venv
        Results("influenciae", "?", args.out).not_installable(repr(error))
        return
    from importlib.metadata import version

    results = Results(
        "influenciae",
        version("influenciae"),
        args.out,
        framework=f"tensorflow {tf.__version__}",
    )
    tf.keras.utils.set_random_seed(0)
    model = build_model(tf, work)
    # Warm-up (TF runtime, kernels); not timed, as for every library.
    model(work.x_test, training=False)

    # Not the workload's 128: influenciae's exact Hessian takes the jacobian of the
    # (batch, p) per-example jacobian, whose pfor intermediates grow with batch**2 * p**2
    # (batch 128: one tensor of [165120, 128, 1280] floats, 108 GB; batch 16 was killed
    # by the OOM killer at 23 GB on this 24 GB machine). 8 is the largest that fits.
    bs = args.batch_size or INFLUENCIAE_BATCH_SIZE
    train_ds = tf.data.Dataset.from_tensor_slices((work.x_train, work.y_train)).batch(bs)
    test_ds = tf.data.Dataset.from_tensor_slices((work.x_test, work.y_test)).batch(work.n_test)
    common_settings = {
        "batch_size": bs,
        "regularisation": "zero-gradient quadratic in the loss: c=2*l2+damping on kernels, "
        "c=damping on biases (see module docstring)",
        "dtype": "float32",
    }
    conversion = "ours = -theirs (influenciae returns +g_test^T H^-1 g_train, no 1/n)"
    # influenciae's start_layer: index into model.layers (Keras 2 Sequential, no InputLayer).
    layer_index = {layer.name: i for i, layer in enumerate(model.layers)}
    plans = [
        ("A", "exact", layer_index["logits"], None),
        ("A", "cg", layer_index["logits"], None),
        ("B", "cg", 0, -1),
    ]
    ctx = SimpleNamespace(
        tf=tf,
        InfluenceModel=InfluenceModel,
        Calculator=FirstOrderInfluenceCalculator,
        results=results,
        work=work,
        model=model,
        train_ds=train_ds,
        test_ds=test_ds,
        settings=common_settings,
        conversion=conversion,
        args=args,
    )
    for workload, solver, start, last in plans:
        if not selected(args, workload, solver):
            continue
        try:
            run(ctx, workload, solver, start, last)
        except Exception as error:  # recorded in the JSON
            results.fail_run(workload, solver, error)


def run(ctx, workload, solver, start, last):
    """One (workload, solver) run; CG runs are capped to two column counts."""
    tf, work, model, results, args = ctx.tf, ctx.work, ctx.model, ctx.results, ctx.args
    InfluenceModel, FirstOrderInfluenceCalculator = ctx.InfluenceModel, ctx.Calculator
    train_ds, test_ds, common_settings, conversion = (
        ctx.train_ds,
        ctx.test_ds,
        ctx.settings,
        ctx.conversion,
    )

    def make_calculator():
        influence_model = InfluenceModel(
            model,
            start_layer=start,
            last_layer=last,
            loss_function=None,
        )
        influence_model.loss_function = make_loss(
            tf, influence_model.weights, work.l2, work.damping
        )
        calculator = FirstOrderInfluenceCalculator(
            influence_model, train_ds, ihvp_calculator="exact" if solver == "exact" else "cgd"
        )
        return influence_model, calculator

    if solver == "exact":
        with Timer() as timer:
            influence_model, calculator = make_calculator()
            scores = scores_matrix(calculator, test_ds, train_ds)
        results.add(
            workload,
            solver,
            int(influence_model.nb_params),
            scores,
            timer.seconds,
            -1.0,
            conversion,
            settings={**common_settings, "solver": "ExactIHVP: tf.linalg.pinv of the mean Hessian"},
        )
        return

    spec = args.cg_columns_a if workload == "A" else args.cg_columns_b
    count, per_batch = (int(m) for m in spec.split(":"))
    # Columns spread evenly over the training set (the cost of a CG solve depends on
    # the training point), solved `per_batch` at a time.
    columns = np.linspace(0, work.n_train - 1, count).round().astype(int)
    subset = tf.data.Dataset.from_tensor_slices(
        (work.x_train[columns], work.y_train[columns])
    ).batch(per_batch)
    with Timer() as timer:
        influence_model, calculator = make_calculator()
        scores, batch_seconds = scores_matrix(calculator, test_ds, subset, timed=True)
    # The first batch also traces the graphs; the later ones are the steady cost.
    steady = float(np.mean(batch_seconds[1:]))
    fixed = timer.seconds - steady * len(batch_seconds)
    estimate = fixed + steady * work.n_train / per_batch
    results.add(
        workload,
        solver,
        int(influence_model.nb_params),
        scores,
        estimate,
        -1.0,
        conversion,
        columns=columns,
        seconds_measured=timer.seconds,
        timing=(
            f"extrapolated to {work.n_train} columns: measured {timer.seconds:.1f} s for "
            f"{count} training columns spread over the set, {per_batch} per batch; "
            f"batches after the first took {steady:.1f} s each "
            f"({', '.join(f'{t:.1f}' for t in batch_seconds)}); estimate = "
            f"{fixed:.1f} s fixed + {steady:.1f} s x {work.n_train}/{per_batch}"
        ),
        settings={
            **common_settings,
            "solver": "ConjugateGradientDescentIHVP, library defaults: n_opt_iters=100, "
            "tol=1e-3 (|r| <= max(1e-3 |b|, 1e-5)); one CG solve per training point",
        },
        notes=f"CG capped: {count} of {work.n_train} training columns",
    )


if __name__ == "__main__":
    main()
