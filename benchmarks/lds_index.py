"""Index methods of the LDS leaderboard (``benchmarks.lds``): scores computed here, sizes, plots.

* ``fisher_scores``: the full-dimensional influence with the empirical Fisher
  ``G^T G / n``, what ``Projected`` tends to as ``dim`` grows;
* ``gauss_newton_scores``: a fitted ``Projected`` index scored with the Gauss-Newton
  matrix in the projected space instead of TRAK's ``Phi^T Phi / n``;
* ``index_size``: what an index keeps for queries;
* ``plot_memory`` / ``plot_ensembles``: LDS against those bytes (Projected and
  Arnoldi, CG as a line) and against the size of a ``Projected`` ensemble.
"""

from __future__ import annotations

import re

import numpy as np

from benchmarks.common.report import pyplot, save_figure

# projected[_gn][_gauss]_<dim>, projected_<dim>x<members>: the projection (Kronecker or
# Gaussian), the curvature (Phi^T Phi / n, or Gauss-Newton), an ensemble's size.
PROJECTED = re.compile(r"projected(_gn)?(_gauss)?_(\d+)(?:x(\d+))?")


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
    im.compile(solver=tfi.solvers.Projected(dim=8), damping=1.0)
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


def gauss_newton_scores(im, model, data, damping, batch_size):
    """``(-Phi_test inv(F_gn + damping*I) Phi^T, damping)`` from a fitted ``Projected``.

    ``Phi`` is its index and ``F_gn = sum_j sum_c pi_jc Phi_jc Phi_jc^T / n`` the
    Gauss-Newton matrix of the softmax cross-entropy in the projected space
    (``Phi_jc`` the projected gradient of the loss at label ``c``, ``pi_jc`` the
    model's probabilities: ``sum_c pi_c (pi - e_c)(pi - e_c)^T = diag(pi) - pi pi^T``),
    in float64. ``damping="auto"``: ten times its mean eigenvalue.
    """
    import tensorflow as tf

    x_train, y_train, x_test, y_test = data
    projection = im.state.index_inverse.projection
    index = np.asarray(im.state.index, np.float64)  # (n, dim)
    n, dim = index.shape
    gram = np.zeros((dim, dim))
    for i in range(0, n, batch_size):
        x = x_train[i : i + batch_size]
        probs = tf.nn.softmax(model(x, training=False)).numpy().astype(np.float64)
        for c in range(probs.shape[1]):
            rows = projection.examples(x, np.full(len(x), c, y_train.dtype)).numpy()
            rows = rows.astype(np.float64) * np.sqrt(probs[:, c : c + 1])
            gram += rows.T @ rows
    gram /= n
    if damping == "auto":
        damping = 10.0 * np.trace(gram) / dim
    tests = projection.examples(x_test, y_test).numpy().astype(np.float64)
    return -tests @ np.linalg.solve(gram + damping * np.eye(dim), index.T), damping


# -- plots -----------------------------------------------------------------------------------
def _family(method):
    """The label of an index method's family (its projection, curvature, damping), or None."""
    base, _, damping = method.partition("@")
    suffix = f" @{damping}" if damping else ""
    found = PROJECTED.fullmatch(base)
    if found is not None and found.group(4) is None:
        family = "Projected, " + ("Gaussian" if found.group(2) else "Kronecker")
        return family + (", Gauss-Newton" if found.group(1) else "") + suffix
    if base.startswith("arnoldi_"):
        return "Arnoldi" + suffix
    return None


def _lines(ax, points, name, protocol):
    """CG (and the full-dimensional Fisher) as horizontal lines."""
    styles = iter(["--", ":", "-.", (0, (5, 1))] * 4)
    for model, method, p, _, score, _ in points:
        if model == name and p == protocol and method.startswith(("cg_gn", "fisher")):
            ax.axhline(score, color="black", linestyle=next(styles), linewidth=1, label=method)


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
            ax.set_ylabel("LDS")
            ax.set_title(f"digits {name}, {protocol} protocol")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        figure.tight_layout()
        save_figure(figure, plot_dir, f"lds_vs_memory_{name}.png")


def plot_ensembles(points, plot_dir):
    """``lds_vs_ensemble_<model>.png``: LDS against the number of models averaged, one
    panel per protocol, CG on Gauss-Newton as a line."""
    for name in sorted({p[0] for p in points}):
        series = {}
        for model, method, protocol, _, score, _ in points:
            base, _, damping = method.partition("@")
            found = PROJECTED.fullmatch(base)
            if model == name and found is not None and found.group(4) is not None:
                label = f"Projected, Kronecker, dim {found.group(3)}"
                label += f" @{damping}" if damping else ""
                series.setdefault((protocol, label), []).append((int(found.group(4)), score))
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
            ax.set_ylabel("LDS")
            ax.set_title(f"digits {name}, {protocol} protocol")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        figure.tight_layout()
        save_figure(figure, plot_dir, f"lds_vs_ensemble_{name}.png")
