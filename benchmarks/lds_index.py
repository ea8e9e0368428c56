"""Index methods of the LDS leaderboard (``benchmarks.lds``): names, scores, sizes, plots.

* ``PROJECTED`` / ``projected_settings``: the names of the ``tfi.solvers.Projected``
  methods and the solver options they stand for (the one place they are parsed);
* ``fisher_scores``: the full-dimensional influence with the empirical Fisher
  ``G^T G / n``, what ``Projected(fisher="empirical")`` tends to as ``dim`` grows;
* ``index_size``: what an index keeps for queries;
* ``plot_memory`` / ``plot_ensembles``: LDS against those bytes (Projected and
  Arnoldi, CG as a line) and against the size of a ``Projected`` ensemble.
"""

from __future__ import annotations

import re

import numpy as np

from benchmarks.common.report import pyplot, save_figure

# projected[_<curvature>][_gauss]_<dim>[x<members>]: the curvature in the projected
# space ("": the solver's default, fisher="true" with samples=1; "exact": samples=
# "exact"; "s<m>": samples=m; "emp": fisher="empirical"), the projection (Kronecker,
# or "_gauss" for the dense Gaussian one), dim, and an ensemble's size.
PROJECTED = re.compile(r"projected(?:_(exact|emp|s\d+))?(_gauss)?_(\d+)(?:x(\d+))?")
PROJECTED_NAMES = "projected[_exact|_emp|_s<m>][_gauss]_<dim>[x<m>]"


def projected_settings(method):
    """``(Projected keyword arguments, members or None)`` of a method name, or None.

    ``method`` is a name without ``@damping``, e.g. ``projected_exact_gauss_4096x4``
    -> ``({"dim": 4096, "projection": "gaussian", "fisher": "true", "samples":
    "exact"}, 4)``.
    """
    found = PROJECTED.fullmatch(method)
    if found is None:
        return None
    curvature, gaussian, dim, members = found.groups()
    options = {"dim": int(dim), "projection": "gaussian" if gaussian else "kronecker"}
    if curvature == "emp":
        options["fisher"] = "empirical"
    else:
        samples = "exact" if curvature == "exact" else int(curvature[1:]) if curvature else 1
        options.update(fisher="true", samples=samples)
    return options, None if members is None else int(members)


def projected_label(options):
    """``"Projected, <projection>, <curvature>"`` of ``projected_settings``'s options."""
    if options["fisher"] == "empirical":
        curvature = "empirical Fisher"
    elif options["samples"] == "exact":
        curvature = "Gauss-Newton, exact"
    else:
        draws = options["samples"]
        curvature = f"Gauss-Newton, {draws} draw" + ("s" if draws > 1 else "")
    return f"Projected, {options['projection'].capitalize()}, {curvature}"


def index_size(im):
    """``(bytes, dim)`` of the index kept for queries, or None without one.

    The bytes: the ``n x dim`` index in float32 and the projection's kept matrices (a
    low-rank basis ``p x r``, a kept dense JL matrix, Kronecker factors). An ensemble's
    Kronecker factors (a few KiB) and the ``dim x dim`` inverse are not counted.
    ``dim`` is per member of an ensemble (an Arnoldi index's kept rank).
    """
    found = im.state.index_inverse
    if found is None:
        return None
    projection = found.projection
    kept = [] if projection.weights is None else projection.weights.weights
    if projection.matrix is not None:
        kept = [projection.matrix]
    rows = int(im.state.index.shape[0]) * projection.dim
    nbytes = 4 * (rows + sum(int(np.prod(w.shape)) for w in kept))
    return nbytes, projection.dim // projection.members


def fisher_scores(model, data, damping, batch_size):
    """``(-g_test^T inv(G^T G / n + damping*I) G^T, damping)``, in float64.

    ``G`` is the ``(n, p)`` matrix of per-example gradients; the inverse by the
    Woodbury identity (an ``n x n`` solve). ``damping="auto"``: ten times the mean
    eigenvalue of ``G^T G / n``. The regulariser is not in the curvature (as in
    ``Projected``).
    """
    import tf_influence as tfi

    x_train, y_train, x_test, y_test = data
    im = tfi.InfluenceModel(model)  # a fitted state, for its per-example gradients
    im.compile(solver=tfi.solvers.Projected(dim=8, fisher="empirical"), damping=1.0)
    im.fit(x_train[:32], y_train[:32], verbose=0)
    g = np.concatenate(
        [
            im.state.gradients(x_train[i : i + batch_size], y_train[i : i + batch_size]).numpy()
            for i in range(0, len(x_train), batch_size)
        ]
    ).astype(np.float64)
    tests = im.state.gradients(x_test, y_test).numpy().astype(np.float64)
    n, p = g.shape
    gram = g @ g.T
    if damping == "auto":
        damping = 10.0 * np.trace(gram) / n / p
    # inv(G^T G / n + d I) = (I - G^T inv(n d I + G G^T) G) / d
    cross = tests @ g.T
    inner = np.linalg.solve(n * damping * np.eye(n) + gram, gram)
    return -(cross - cross @ inner) / damping, damping


# -- plots -----------------------------------------------------------------------------------
def _family(method):
    """The label of an index method's family (its projection, curvature, damping), or None."""
    base, _, damping = method.partition("@")
    suffix = f" @{damping}" if damping else ""
    found = projected_settings(base)
    if found is not None and found[1] is None:
        return projected_label(found[0]) + suffix
    if base.startswith("arnoldi_"):
        return "Arnoldi" + suffix
    return None


def _lines(ax, points, name, protocol):
    """CG (and the full-dimensional Fisher) as horizontal lines."""
    styles = iter(["--", ":", "-.", (0, (5, 1))] * 4)
    for model, method, p, _, score, _ in points:
        if model == name and p == protocol and method.startswith(("cg_gn", "fisher")):
            ax.axhline(score, color="black", linestyle=next(styles), linewidth=1, label=method)


def _finish(figure, axes, protocols, name, plot_dir, filename):
    """Labels each protocol's panel, puts the legend right of the last one, and saves."""
    for ax, protocol in zip(axes[0], protocols, strict=True):
        ax.set_ylabel("LDS")
        ax.set_title(f"digits {name}, {protocol} protocol")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    figure.tight_layout()
    save_figure(figure, plot_dir, filename)


def plot_memory(points, plot_dir):
    """``lds_vs_memory_<model>.png``: LDS against the index's bytes, one panel per protocol."""
    for name in sorted({p[0] for p in points}):
        mine = [p for p in points if p[0] == name and p[5] is not None and _family(p[1])]
        if not mine:
            continue
        plt = pyplot()
        protocols = sorted({p[2] for p in mine})
        figure, axes = plt.subplots(
            1, len(protocols), figsize=(5 * len(protocols) + 3, 4.5), squeeze=False
        )
        for ax, protocol in zip(axes[0], protocols, strict=True):
            series = {}
            for _, method, p, _, score, (nbytes, dim) in mine:
                if p == protocol:
                    size = f"r={dim}" if method.startswith("arnoldi") else str(dim)
                    series.setdefault(_family(method), []).append((nbytes / 2**20, score, size))
            for family, values in sorted(series.items()):
                values.sort()
                xs, ys, sizes = zip(*values, strict=True)
                ax.plot(xs, ys, marker="o", label=family)
                for x, y, size in values:
                    ax.annotate(size, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
            _lines(ax, points, name, protocol)
            ax.set_xscale("log")
            ax.set_xlabel("index kept for queries, MiB (n x dim float32 + projection)")
        _finish(figure, axes, protocols, name, plot_dir, f"lds_vs_memory_{name}.png")


def plot_ensembles(points, plot_dir):
    """``lds_vs_ensemble_<model>.png``: LDS against the number of models averaged, one
    panel per protocol, CG on Gauss-Newton as a line."""
    for name in sorted({p[0] for p in points}):
        series = {}
        for model, method, protocol, _, score, _ in points:
            base, _, damping = method.partition("@")
            found = projected_settings(base)
            if model == name and found is not None and found[1] is not None:
                options, members = found
                label = f"{projected_label(options)}, dim {options['dim']}"
                label += f" @{damping}" if damping else ""
                series.setdefault((protocol, label), []).append((members, score))
        if not series:
            continue
        plt = pyplot()
        protocols = sorted({protocol for protocol, _ in series})
        figure, axes = plt.subplots(
            1, len(protocols), figsize=(4.5 * len(protocols) + 3, 4), squeeze=False
        )
        sizes = sorted({m for values in series.values() for m, _ in values})
        for ax, protocol in zip(axes[0], protocols, strict=True):
            for (p, label), values in sorted(series.items()):
                if p == protocol:
                    ax.plot(*zip(*sorted(values), strict=True), marker="o", label=label)
            _lines(ax, [p for p in points if p[1].startswith("cg_gn")], name, protocol)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.get_xaxis().set_major_formatter("{x:.0f}")
            ax.set_xlabel("models in the ensemble (trained independently)")
        _finish(figure, axes, protocols, name, plot_dir, f"lds_vs_ensemble_{name}.png")
