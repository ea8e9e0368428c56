"""Row 2: how much faster is ``explain`` than a careful straightforward implementation?

``explain`` of 20 test points against every training point (CG) versus the
straightforward implementation of ``benchmarks.common.reference`` in the same
process: per-example gradients in a Python loop, a nested-tape HVP ``tf.function``,
``scipy.sparse.linalg.cg`` with numpy round trips, one solve per test point. Time
ratio and Pearson correlation, for the first call (tracing included), a second call
on new test points (which starts from the search directions CG kept from the first),
calls 5-8, the same second call with ``CG(recycle=0)``, and both sides at a looser
tolerance (``LOOSE_TOL``).

Usage, from the repository root::

    .venv/bin/python -m benchmarks.explain                # both models (minutes: the CNN's
                                                          # reference is slow)
    .venv/bin/python -m benchmarks.explain --quick        # the MLP only
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.common.digits import CG_MAX_ITER, CG_TOL, DAMPING, NUM_TESTS
from benchmarks.common.reference import Reference
from benchmarks.common.session import Session, parse_args
from benchmarks.common.timing import log

ROW = 2
LOOSE_TOL = 1e-3  # also compares both sides at this looser tolerance


def run(session):
    """Adds row 2's lines to ``session.table``."""
    import tf_influence as tfi

    command = session.command(2)
    for name in session.reference_models():
        log(f"row 2: explain vs straightforward, {name}")
        x, y = session.train_xy(name)
        first_x, first_y = session.test_xy(name, 0, NUM_TESTS)
        new_x, new_y = session.test_xy(name, NUM_TESTS, 2 * NUM_TESTS)
        damping = DAMPING[name]

        reference = Reference(session.models[name], x, y, session.batch_size, damping)
        reference.warm_up()
        start = time.perf_counter()
        expected, iterations, solving, scoring = reference.explain(
            first_x, first_y, CG_TOL, CG_MAX_ITER
        )
        reference_seconds = time.perf_counter() - start
        log(f"  reference: {reference_seconds:.1f} s, CG iterations {iterations}")

        start = time.perf_counter()
        im = tfi.InfluenceModel(session.models[name])
        im.compile(solver=tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER), damping=damping)
        im.fit(x, y, batch_size=session.batch_size, verbose=0)
        scores = im.explain(first_x, first_y, verbose=0)
        cold = time.perf_counter() - start
        cold_iterations = im.diagnostics.iterations
        start = time.perf_counter()
        new_scores = im.explain(new_x, new_y, verbose=0)
        times = [time.perf_counter() - start]
        warm_iterations = im.diagnostics.iterations
        recycled = im.diagnostics.info.get("recycled_directions", 0)
        times += later_calls(session, im, name)
        warm = float(np.median(times))
        # Calls 5-8: the recycled space has grown (recycle="auto" keeps more
        # directions where products cost more per parameter, as on the CNN).
        steady = float(np.median(later_calls(session, im, name, count=4, first_set=4)))
        steady_iterations = im.diagnostics.iterations
        steady_recycled = im.diagnostics.info.get("recycled_directions", 0)
        # The second call starts from directions the first one kept (CG's
        # recycling): check its scores against the reference too.
        new_expected, _, _, _ = reference.explain(new_x, new_y, CG_TOL, CG_MAX_ITER)
        # The same second call with every solve on its own (no recycled directions).
        _, alone_seconds, alone_iterations = second_calls(
            session, name, tfi.solvers.CG(tol=CG_TOL, max_iter=CG_MAX_ITER, recycle=0)
        )
        agreement = []
        for ours, theirs in ((scores, expected), (new_scores, new_expected)):
            pearson = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
            error = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
            agreement.append((pearson, error))

        setting = (
            f"{NUM_TESTS} test x {len(x)} train, CG tol={CG_TOL:g}, damping={damping:g}, "
            f"B={session.batch_size}"
        )
        reference_text = (
            f"{reference_seconds:.1f} s ({NUM_TESTS} SciPy solves of "
            f"{min(iterations)}-{max(iterations)} it. {solving:.1f} s, gradient loop "
            f"{scoring:.1f} s)"
        )
        speedup = reference_seconds / cold
        session.table.add(
            2,
            "explain time, first call (compile+fit+explain, incl. tracing)",
            name,
            setting,
            f"{cold:.1f} s ({cold_iterations} it.)",
            reference_text,
            f"{speedup:.1f}x faster",
            ">= 10x",
            speedup >= 10,
            command,
        )
        speedup = reference_seconds / warm
        session.table.add(
            2,
            "explain time, second call on 20 new test points (median of 3 such calls)",
            name,
            setting,
            f"{warm:.2f} s ({warm_iterations} it., {recycled} recycled directions)",
            reference_text,
            f"{speedup:.1f}x faster",
            ">= 10x",
            speedup >= 10,
            command,
        )
        speedup = reference_seconds / steady
        session.table.add(
            2,
            "explain time, calls 5-8 on 20 new test points each (median)",
            name,
            setting,
            f"{steady:.2f} s ({steady_iterations} it. in call 8, {steady_recycled} recycled "
            "directions)",
            reference_text,
            f"{speedup:.1f}x faster",
            ">= 10x",
            speedup >= 10,
            command,
        )
        speedup = reference_seconds / alone_seconds
        session.table.add(
            2,
            "explain time, second call on 20 new test points, CG(recycle=0) (median of 3)",
            name,
            setting,
            f"{alone_seconds:.2f} s ({alone_iterations} it.)",
            reference_text,
            f"{speedup:.1f}x faster",
            ">= 10x",
            speedup >= 10,
            command,
        )
        loose(session, name, reference, reference_seconds, new_expected, setting, command)
        for call, (pearson, error) in zip(("first", "second"), agreement, strict=True):
            session.table.add(
                2,
                f"Pearson of the two {NUM_TESTS} x {len(x)} score matrices, {call} call",
                name,
                setting,
                f"{pearson:.6f}",
                f"max abs diff / max abs = {error:.1e}",
                "",
                ">= 0.99",
                pearson >= 0.99,
                command,
            )


def loose(session, name, reference, tight_seconds, tight_expected, setting, command):
    """Row 2's second calls with both sides at ``LOOSE_TOL``; Pearson against the tight
    reference. Shows whether a looser tolerance changes the ratio."""
    import tf_influence as tfi

    new_x, new_y = session.test_xy(name, NUM_TESTS, 2 * NUM_TESTS)
    start = time.perf_counter()
    loose_expected, iterations, _, _ = reference.explain(new_x, new_y, LOOSE_TOL, CG_MAX_ITER)
    reference_seconds = time.perf_counter() - start
    scores, seconds, ours_iterations = second_calls(
        session, name, tfi.solvers.CG(tol=LOOSE_TOL, max_iter=CG_MAX_ITER)
    )
    ours_pearson = float(np.corrcoef(scores.ravel(), tight_expected.ravel())[0, 1])
    reference_pearson = float(np.corrcoef(loose_expected.ravel(), tight_expected.ravel())[0, 1])
    session.table.add(
        2,
        f"second call, both sides at CG tol={LOOSE_TOL:g} (median of 3); Pearson vs the "
        f"reference at tol={CG_TOL:g}",
        name,
        setting.replace(f"tol={CG_TOL:g}", f"tol={LOOSE_TOL:g}"),
        f"{seconds:.2f} s ({ours_iterations} it.), Pearson {ours_pearson:.6f}",
        f"{reference_seconds:.1f} s ({min(iterations)}-{max(iterations)} it.), Pearson "
        f"{reference_pearson:.6f}",
        f"{reference_seconds / seconds:.1f}x faster",
        ">= 10x",
        reference_seconds / seconds >= 10,
        command,
    )
    session.table.add(
        2,
        f"ours at tol={LOOSE_TOL:g} (second call above) vs the reference at tol={CG_TOL:g}",
        name,
        setting,
        f"{seconds:.2f} s, Pearson {ours_pearson:.6f}",
        f"{tight_seconds:.1f} s",
        f"{tight_seconds / seconds:.1f}x faster",
        "(not equal tolerances)",
        None,
        command,
    )


def second_calls(session, name, solver):
    """A fresh model with ``solver`` explains the first 20 test points; then its second
    call and two later ones are timed. Returns the second call's scores, the median
    seconds of the three calls and the second call's iterations."""
    import tf_influence as tfi

    x, y = session.train_xy(name)
    im = tfi.InfluenceModel(session.models[name])
    im.compile(solver=solver, damping=DAMPING[name])
    im.fit(x, y, batch_size=session.batch_size, verbose=0)
    im.explain(*session.test_xy(name, 0, NUM_TESTS), verbose=0)
    start = time.perf_counter()
    scores = im.explain(*session.test_xy(name, NUM_TESTS, 2 * NUM_TESTS), verbose=0)
    times = [time.perf_counter() - start]
    iterations = im.diagnostics.iterations
    return scores, float(np.median(times + later_calls(session, im, name))), iterations


def later_calls(session, im, name, count=2, first_set=2):
    """Seconds of ``explain`` on ``count`` more sets of 20 new test points."""
    times = []
    for j in range(first_set, first_set + count):
        x_new, y_new = session.test_xy(name, j * NUM_TESTS, (j + 1) * NUM_TESTS)
        start = time.perf_counter()
        im.explain(x_new, y_new, verbose=0)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None):
    args = parse_args(argv, rows=(ROW,), description=__doc__.splitlines()[0])
    Session(args).run({ROW: run})


if __name__ == "__main__":
    main()
