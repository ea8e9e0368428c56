"""Row 4: how do time and memory of ``explain`` grow with the training set?

Time and peak memory of ``explain`` (20 test points, CG with a fixed number of
iterations, ``top_k=10`` output) as the digits training set grows 1x -> 10x -> 50x
(noisy copies), each size in its own subprocess; and, at the largest size, the dense
``(20, n)`` output against ``top_k``. Writes ``time_vs_train_size.png`` (time
against training-set size) into ``--plot-dir`` and prints the numbers it shows.

Usage, from the repository root::

    .venv/bin/python -m benchmarks.scaling                # 1x, 10x, 50x and dense
    .venv/bin/python -m benchmarks.scaling --quick        # 1x and 5x
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

from benchmarks.common import digits
from benchmarks.common.report import pyplot, save_figure
from benchmarks.common.session import Session, parse_args
from benchmarks.common.timing import log, peak_rss_mb, reset_peak, status_mib

ROW = 4
TOP_K = 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = "time_vs_train_size.png"


def run(session):
    """Adds row 4's lines to ``session.table`` and writes the plot."""
    command = session.command(ROW)
    name = "mlp"
    if name not in session.models:
        log("row 4 needs the mlp model (--models mlp); skipped")
        return
    factors = session.args.scale
    iterations = 5 if session.quick else 10
    runs = [("top_k", factor) for factor in factors]
    if not session.quick:
        runs.append(("dense", factors[-1]))
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        weights = os.path.join(directory, "mlp.weights.h5")
        session.models[name].save_weights(weights)
        for variant, factor in runs:
            log(f"row 4: {variant} output, {factor}x training set (subprocess)")
            spec = {
                "weights": weights,
                "factor": factor,
                "variant": variant,
                "iterations": iterations,
                "batch_size": session.batch_size,
            }
            output = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling", "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
                cwd=ROOT,
            )
            lines = [s for s in output.stdout.splitlines() if s.startswith("{")]
            if output.returncode != 0 or not lines:
                raise RuntimeError(
                    f"child {spec} failed:\n{output.stdout}\n{output.stderr[-3000:]}"
                )
            results[(variant, factor)] = json.loads(lines[-1])
            log(f"  {results[(variant, factor)]}")
    n = len(session.data[0])
    base = results[("top_k", factors[0])]
    for variant, factor in runs:
        result = results[(variant, factor)]
        output_text = f"top_k={TOP_K}" if variant == "top_k" else "dense (20, n) output"
        setting = (
            f"{output_text}, {factor}x = {factor * n} train, CG {iterations} it. fixed, "
            f"B={session.batch_size}"
        )
        if variant == "top_k":
            reference, ideal = base, factor / factors[0]
            what = f"explain time vs {factors[0]}x (top_k={TOP_K})"
        else:
            reference, ideal = results[("top_k", factor)], 1
            what = f"explain time, dense output vs top_k={TOP_K}, same size"
        ratio = result["seconds"] / reference["seconds"]
        session.table.add(
            4,
            what,
            name,
            setting,
            f"{result['seconds']:.2f} s",
            f"{reference['seconds']:.2f} s",
            f"{ratio:.1f}",
            f"ideal {ideal:g}",
            None,
            command,
        )
    for variant, factor in runs:
        result = results[(variant, factor)]
        output_text = f"top_k={TOP_K}" if variant == "top_k" else "dense output"
        reference = base if variant == "top_k" else results[("top_k", factor)]
        total = result["peak_total"] - result["rss_data"]
        reference_total = reference["peak_total"] - reference["rss_data"]
        if result["peak_explain"] is not None:
            explain = result["peak_explain"] - result["rss_before_explain"]
            reference_explain = reference["peak_explain"] - reference["rss_before_explain"]
            measured = f"explain +{explain:.0f} MiB; fit+trace+explain +{total:.0f} MiB"
            baseline = f"+{reference_explain:.0f}; +{reference_total:.0f} MiB"
            ratio = f"{explain - reference_explain:+.0f}; {total - reference_total:+.0f} MiB"
        else:
            measured = f"fit+trace+explain +{total:.0f} MiB"
            baseline = f"+{reference_total:.0f} MiB"
            ratio = f"{total - reference_total:+.0f} MiB"
        vs = f"{factors[0]}x" if variant == "top_k" else f"top_k={TOP_K}"
        session.table.add(
            4,
            f"peak RSS growth vs {vs}",
            name,
            f"{output_text}, {factor}x = {factor * n} train (model+data resident "
            f"{result['rss_data']:.0f} MiB)",
            measured,
            baseline,
            ratio,
            "ideal +0 (flat)",
            None,
            command,
        )

    plot(session, results, factors, iterations)


def plot(session, results, factors, iterations):
    """``time_vs_train_size.png``: explain time against training-set size, log-log, with
    the line of proportional growth; the numbers go to ``session.notes``."""
    sizes = [results[("top_k", f)]["n_train"] for f in factors]
    seconds = [results[("top_k", f)]["seconds"] for f in factors]
    rows = [f"| {n} | top_k={TOP_K} | {s:.3f} |" for n, s in zip(sizes, seconds, strict=True)]
    dense = results.get(("dense", factors[-1]))
    if dense is not None:
        rows.append(f"| {dense['n_train']} | dense (20, n) | {dense['seconds']:.3f} |")
    session.notes.append(
        f"Plotted in {PLOT} (`{session.command(ROW)}`):\n\n"
        "| training examples | output | explain seconds |\n|---|---|---|\n" + "\n".join(rows)
    )
    if not session.args.plot_dir:
        return
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    axes.plot(sizes, seconds, "o-", label=f"explain, top_k={TOP_K}")
    axes.plot(
        sizes,
        [seconds[0] * n / sizes[0] for n in sizes],
        ":",
        color="gray",
        label="proportional to n",
    )
    if dense is not None:
        axes.plot([dense["n_train"]], [dense["seconds"]], "s", label="explain, dense (20, n)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(sizes, [f"{n:,}" for n in sizes])
    axes.minorticks_off()
    axes.set_xlabel("training examples n")
    axes.set_ylabel("seconds")
    axes.set_title(
        f"explain of {digits.NUM_TESTS} test points, digits MLP, CG {iterations} iterations",
        fontsize=9,
    )
    axes.legend(fontsize=8)
    axes.grid(True, alpha=0.3)
    save_figure(figure, session.args.plot_dir, PLOT)


def child(spec):
    """One training-set size: time and peak memory of fit + explain, one JSON line.

    Memory: ``rss_data`` is the RSS once model and data are built (what a baseline
    child that does not explain would hold); the peak is then reset (Linux
    ``/proc/self/clear_refs``), so ``peak_total`` is the peak of fit + tracing +
    explain and ``peak_explain`` the peak of the timed ``explain`` alone. Without
    ``clear_refs`` it falls back to the peak at the end minus the peak before fit.
    """
    import tensorflow as tf

    import tf_influence as tfi

    warnings.simplefilter("ignore")
    x_train, y_train, x_test, y_test = digits.load_data()
    x, y = digits.grown(x_train, y_train, spec["factor"])
    model = digits.build_model("mlp")
    model.load_weights(spec["weights"])
    can_reset = reset_peak()
    rss_data = status_mib("VmRSS") if can_reset else peak_rss_mb()

    im = tfi.InfluenceModel(model)
    solver = tfi.solvers.CG(tol=1e-30, max_iter=spec["iterations"])
    im.compile(solver=solver, damping=digits.DAMPING["mlp"])
    im.fit(x, y, batch_size=spec["batch_size"], verbose=0)
    # Trace everything explain runs, on the same operator, without doing its work: a zero
    # right-hand side stops CG before its first iteration.
    test_x, test_y = x_test[: digits.NUM_TESTS], y_test[: digits.NUM_TESTS]
    zeros = tf.zeros([im.num_params, digits.NUM_TESTS], im.objective.dtype)
    gradients = im.state.gradients
    im.solver.solve(im.operator, zeros)
    gradients(test_x, test_y).numpy()
    gradients.scores(x[: spec["batch_size"]], y[: spec["batch_size"]], zeros)[0].numpy()
    del zeros
    peak_setup = peak_rss_mb()
    rss_before = status_mib("VmRSS")
    if can_reset:
        reset_peak()

    top_k = TOP_K if spec["variant"] == "top_k" else None
    start = time.perf_counter()
    result = im.explain(test_x, test_y, verbose=0, top_k=top_k)
    seconds = time.perf_counter() - start
    peak_explain = peak_rss_mb()
    if im.diagnostics.iterations != spec["iterations"]:
        raise RuntimeError(f"CG ran {im.diagnostics.iterations} iterations: {im.diagnostics}")
    del result
    print(
        json.dumps(
            {
                "n_train": len(x),
                "seconds": seconds,
                "rss_data": rss_data,
                "rss_before_explain": rss_before,
                "peak_total": max(peak_setup, peak_explain),
                "peak_explain": peak_explain if can_reset else None,
            }
        ),
        flush=True,
    )


def main(argv=None):
    args = parse_args(argv, rows=(ROW,), description=__doc__.splitlines()[0], default_models="mlp")
    if args.child:
        child(json.loads(args.child))
        return
    Session(args).run({ROW: run})


if __name__ == "__main__":
    main()
