"""Row 1: how much does a Hessian-vector product cost, next to a gradient?

Hessian-vector product over the training set / gradient of the mean loss over the
same batches (both compiled ``tf.function``s), for ``hvp="reverse_over_reverse"``
and ``hvp="forward_over_reverse"``, with 1 and 20 vectors per product, beside the
straightforward nested-tape product of ``benchmarks.common.reference``; then one
vector at a wider batch (``WIDE_BATCH``).

Usage, from the repository root::

    .venv/bin/python -m benchmarks.products               # both models
    .venv/bin/python -m benchmarks.products --quick --models mlp
"""

from __future__ import annotations

import numpy as np

from benchmarks.common.digits import DAMPING, NUM_TESTS, SEED
from benchmarks.common.reference import Reference
from benchmarks.common.session import Session, parse_args
from benchmarks.common.timing import compare, fmt_time, log

ROW = 1
HVP_MODES = ("reverse_over_reverse", "forward_over_reverse")
WIDE_BATCH = 512  # also measures one vector at this batch size


def gradient_pass(session, im, name):
    """Gradient of the mean loss + Omega over the training set, same batches as the HVP."""
    import tensorflow as tf

    objective = im.objective
    variables = objective.variables
    layout = objective.layout
    x, y = session.train_xy(name)
    x_t, y_t = tf.constant(x), tf.constant(y)
    n, size = len(x), im.state.batch_size
    full, rest = divmod(n, size)

    def take(t, start, count):
        begin = [start] + [0] * (len(t.shape) - 1)
        return tf.slice(t, begin, [count] + list(t.shape[1:]))

    def batch_gradient(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(objective.per_example_loss(xb, yb)) / n
        return layout.flatten(tape.gradient(loss, variables))

    @tf.function
    def gradient():
        total = tf.zeros([layout.num_params], objective.dtype)
        for i in tf.range(full):
            total += batch_gradient(take(x_t, i * size, size), take(y_t, i * size, size))
        if rest:
            total += batch_gradient(x_t[full * size :], y_t[full * size :])
        with tf.GradientTape() as tape:
            omega = objective.regularization()
        return total + layout.flatten(tape.gradient(omega, variables), objective.dtype)

    return gradient


def transposed_product(session, name, vectors, default):
    """``op.matvec(vectors)`` on a copy of model ``name``, traced with pfor's own MatMul.

    Returns a function to time; its first call traces with
    ``vectorize.BROADCAST_MATMUL`` off (the transposes the default trace avoids), and
    its product is checked against that of ``default``, the model's own operator.
    """
    import keras

    import tf_influence as tfi
    from tf_influence.engine import vectorize

    original = session.models[name]
    copy = keras.models.clone_model(original)
    copy.set_weights(original.get_weights())
    copy.compile(loss=original.loss)
    im = tfi.InfluenceModel(copy)
    im.compile(solver=tfi.solvers.CG(), damping=DAMPING[name])
    x, y = session.train_xy(name)
    im.fit(x, y, batch_size=session.batch_size, verbose=0)
    operator = im.operator

    def product():
        vectorize.BROADCAST_MATMUL = False
        try:
            return operator.matvec(vectors)
        finally:
            vectorize.BROADCAST_MATMUL = True

    product.keep = (copy, im)  # alive as long as the function is timed
    ours, expected = product().numpy(), default.matvec(vectors).numpy()
    error = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    if error > 1e-4:
        raise AssertionError(f"the two traces' products differ: {error:.1e} relative")
    return product


def run(session):
    """Adds row 1's lines to ``session.table``."""
    import tensorflow as tf

    command = session.command(1)
    for name in session.args.models:
        log(f"row 1: HVP / gradient, {name}")
        x, y = session.train_xy(name)
        operators = {}
        for mode in HVP_MODES:
            operators[mode] = session.influence_model(name, hvp=mode).operator
        gradient = gradient_pass(session, session.influence_model(name), name)
        reference = Reference(session.models[name], x, y, session.batch_size, DAMPING[name])
        p = operators[HVP_MODES[0]].num_params
        rng = np.random.default_rng(SEED)
        v1 = tf.constant(rng.normal(size=p).astype(np.float32))
        v20 = tf.constant(rng.normal(size=(p, NUM_TESTS)).astype(np.float32))
        fns = {"gradient": gradient, ("reference", 1): lambda r=reference, v=v1: r.hvp(v)}
        for mode, op in operators.items():
            fns[(mode, 1)] = lambda op=op, v=v1: op.matvec(v)
        one = compare(fns, session.repeats)
        fns = {"gradient": gradient}
        for mode, op in operators.items():
            fns[(mode, NUM_TESTS)] = lambda op=op, v=v20: op.matvec(v)
        # The same product traced with TensorFlow's own pfor MatMul converter (two
        # transposes around each product whose second factor varies with the column),
        # on a copy of the model, so that it gets traces of its own.
        fns[("transposes", NUM_TESTS)] = transposed_product(
            session, name, v20, operators[HVP_MODES[0]]
        )
        many = compare(fns, session.repeats)
        base = {1: one["gradient"][1], NUM_TESTS: many["gradient"][1]}
        setting = f"B={session.batch_size}, damping={DAMPING[name]:g}"
        lines = [(mode, 1, one) for mode in HVP_MODES]
        lines.append(("reference", 1, one))
        lines += [(mode, NUM_TESTS, many) for mode in (*HVP_MODES, "transposes")]
        for mode, k, results in lines:
            seconds = results[(mode, k)][1]
            per_column = seconds / k
            ratio = per_column / base[k]
            if k == 1:
                what = "HVP / gradient time, 1 vector"
                measured = fmt_time(seconds)
            else:
                what = f"HVP / gradient time per column, {k} vectors"
                measured = f"{fmt_time(per_column)}/col ({fmt_time(seconds)})"
            if mode == "reference":
                label = "straightforward nested tapes, static shape (p,) (row 2's reference)"
            elif mode == "transposes":
                label = (
                    '`op.matvec`, hvp="reverse_over_reverse" traced with TensorFlow\'s own '
                    "pfor MatMul converter (`vectorize.BROADCAST_MATMUL = False`)"
                )
            else:
                label = f'`op.matvec`, hvp="{mode}"'
            session.table.add(
                1,
                what,
                name,
                f"{label}, {setting}",
                measured,
                f"gradient {fmt_time(base[k])}",
                f"{ratio:.2f}",
                "<= 2.5",
                ratio <= 2.5,
                command,
            )
        trace = {mode: one[(mode, 1)][0] for mode in HVP_MODES}
        session.table.add(
            1,
            "first matvec (tracing) time, reverse_over_reverse vs forward_over_reverse",
            name,
            setting,
            fmt_time(trace["reverse_over_reverse"]),
            fmt_time(trace["forward_over_reverse"]),
            f"{trace['reverse_over_reverse'] / trace['forward_over_reverse']:.2f}",
            "",
            None,
            command,
        )
        wide_batch(session, name, command)


def wide_batch(session, name, command):
    """One vector at a wider batch: a product has ~3x a gradient's ops per batch,
    so on small models fewer, larger batches move the ratio toward its arithmetic."""
    import tensorflow as tf

    size = min(WIDE_BATCH, len(session.train_xy(name)[0]))
    if size == session.batch_size:
        return
    im = session.influence_model(name, batch_size=size)
    operator = im.operator
    rng = np.random.default_rng(SEED)
    v1 = tf.constant(rng.normal(size=operator.num_params).astype(np.float32))
    results = compare(
        {"gradient": gradient_pass(session, im, name), "hvp": lambda: operator.matvec(v1)},
        session.repeats,
    )
    gradient, product = results["gradient"][1], results["hvp"][1]
    ratio = product / gradient
    session.table.add(
        1,
        "HVP / gradient time, 1 vector",
        name,
        f'`op.matvec`, hvp="{HVP_MODES[0]}", B={size}, damping={DAMPING[name]:g}',
        fmt_time(product),
        f"gradient {fmt_time(gradient)}",
        f"{ratio:.2f}",
        "<= 2.5",
        ratio <= 2.5,
        command,
    )


def main(argv=None):
    args = parse_args(argv, rows=(ROW,), description=__doc__.splitlines()[0])
    Session(args).run({ROW: run})


if __name__ == "__main__":
    main()
