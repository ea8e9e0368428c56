"""Row 3: how fast is scoring every training point against the solved vectors?

Scoring (``scoring="jvp"``, ``"jacobian"`` with its factored Dense/Conv2D layers,
and ``"jacobian"`` by pfor alone) versus a Python loop over per-example gradients
(``benchmarks.common.reference``); each runs the loop ``explain`` runs after solving
(``state.training_blocks``). Then the jvp / jacobian time ratio for 1 to 64 solved
vectors per pass, to show where they cross.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.scoring                # both models
    .venv/bin/python -m benchmarks.scoring --quick        # the MLP only
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common.digits import DAMPING, NUM_TESTS, SEED
from benchmarks.common.reference import Reference
from benchmarks.common.session import Session, parse_args
from benchmarks.common.timing import compare, fmt_time, log, one_blas_thread

ROW = 3
SCORING_MODES = ("jvp", "jacobian")
PFOR_ONLY = "jacobian, pfor only"
SCORING_LABELS = {
    "jvp": 'scoring="jvp"',
    "jacobian": 'scoring="jacobian" (factored Dense/Conv2D)',
    PFOR_ONLY: 'scoring="jacobian", pfor only (factoring off)',
}
SCORING_KS = (1, 8, NUM_TESTS, 64)  # solved vectors per scoring pass, jvp vs jacobian


def scorers(objective):
    """``{mode: PerExampleGradients}`` for the three ways of scoring compared here."""
    import tf_influence as tfi

    out = {mode: tfi.engine.PerExampleGradients(objective, mode) for mode in SCORING_MODES}
    # The same per-example gradients by pfor alone, without the factored layers.
    out[PFOR_ONLY] = tfi.engine.PerExampleGradients(objective, "jacobian", factored=False)
    return out


def score_all(state, scorer, vectors):
    """The loop ``explain`` runs after solving, with ``scorer``: as many batches per pass as
    the scorer takes, one numpy block per pass. Returns ``(k, n)`` scores."""
    state.gradients = scorer
    rows = state.rows_per_pass(int(vectors.shape[1]))
    blocks = [block for _, block, _ in state.training_blocks(vectors, 0, rows)]
    return np.concatenate(blocks, axis=1)


def run(session):
    """Adds row 3's lines to ``session.table``."""
    import tensorflow as tf

    command = session.command(ROW)
    for name in session.reference_models():
        log(f"row 3: scoring vs Python loop, {name}")
        x, y = session.train_xy(name)
        test_x, test_y = session.test_xy(name, 0, NUM_TESTS)
        im = session.influence_model(name)
        solutions = im.inverse_hvp_tests(test_x, test_y, verbose=0)  # (p, 20)
        state = im.state
        ways = scorers(im.objective)

        # 64 columns: the 20 solutions and 44 random vectors (time does not depend on
        # the values), to see where the jvp / jacobian crossover lies.
        extra = np.random.default_rng(SEED).normal(size=(im.num_params, 44))
        wide = tf.concat([solutions, tf.constant(extra, solutions.dtype)], axis=1)
        results = {}
        for k in SCORING_KS:
            vectors = tf.constant(wide[:, :k])
            fns = {
                mode: (lambda s=scorer, v=vectors, state=state: score_all(state, s, v))
                for mode, scorer in ways.items()
            }
            results[k] = compare(fns, session.repeats)

        reference = Reference(session.models[name], x, y, session.batch_size, DAMPING[name])
        reference.warm_up()
        solutions_np = solutions.numpy()
        with one_blas_thread():
            start = time.perf_counter()
            expected = reference.scores(solutions_np)
            loop_seconds = time.perf_counter() - start
        error = max(
            float(np.max(np.abs(score_all(state, scorer, solutions) - expected)))
            for scorer in ways.values()
        ) / float(np.max(np.abs(expected)))

        setting = f"{len(x)} train x {NUM_TESTS} solved vectors, B={session.batch_size}"
        for mode in (*SCORING_MODES, PFOR_ONLY):
            seconds = results[NUM_TESTS][mode][1]
            speedup = loop_seconds / seconds
            session.table.add(
                3,
                "score all training points",
                name,
                f"{SCORING_LABELS[mode]}, {setting}",
                fmt_time(seconds),
                f"Python loop {fmt_time(loop_seconds)} (max rel. diff {error:.0e})",
                f"{speedup:.0f}x faster",
                ">= 50x",
                speedup >= 50,
                command,
            )
        for k in SCORING_KS:
            jvp, jacobian = results[k]["jvp"][1], results[k]["jacobian"][1]
            pfor = results[k][PFOR_ONLY][1]
            session.table.add(
                3,
                "scoring time jvp / jacobian (pfor only / jacobian)",
                name,
                f"{k} solved vector{'s' if k > 1 else ''}, B={session.batch_size}",
                f"jvp {fmt_time(jvp)}, pfor only {fmt_time(pfor)}",
                f"jacobian {fmt_time(jacobian)}",
                f"{jvp / jacobian:.2f} ({pfor / jacobian:.2f})",
                "(< 1: jvp faster)",
                None,
                command,
            )


def main(argv=None):
    args = parse_args(argv, rows=(ROW,), description=__doc__.splitlines()[0])
    Session(args).run({ROW: run})


if __name__ == "__main__":
    main()
