"""Influence of the digits workload with pyDVL's influence module (torch backend).

Run with the torch venv (see setup_envs.sh)::

    /tmp/bench-torch/bin/python -m benchmarks.external.run_pydvl \
        --workload /tmp/bench/workload.npz --out /tmp/bench/results

What pyDVL computes (``DirectInfluence`` / ``CgInfluence``, ``influences(x_test,
y_test, x_train, y_train, mode=InfluenceMode.Up)``):
``<(H_loss + r*I)^-1 grad L(z_test), grad L(z_j)>``, with ``H_loss`` the Hessian of
the mean loss (``torch.nn.functional.cross_entropy``, mean-reduced over each batch,
batches weighted by their size) and ``r`` its ``regularization`` argument. No minus
sign and no ``1/n``: ``factor = -1``.

Regularisation: pyDVL's loss sees only ``(outputs, targets)``, so a weight penalty
cannot be part of the loss; its ``regularization`` adds ``r * I`` to the whole block.
We pass ``r = 2*l2 + damping = 3e-3``: exact for the kernel entries (L2 Hessian
``2*l2`` plus damping), ``2*l2`` too much on the bias entries (10 of 1,290
parameters for workload A, 266 of 26,122 for B), where our objective has only the
damping. ``compare.py`` quantifies this with a matched variant of ours.

Parameters: workload A sets ``requires_grad=False`` on the two hidden layers
(pyDVL takes the parameters that require gradients).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from benchmarks.external.common import Results, Timer, Workload, parse_args, selected


def build_torch_model(torch, work):
    """The same MLP as the Keras model; kernels (in, out) become weights (out, in)."""
    nn = torch.nn
    model = nn.Sequential(
        OrderedDict(
            [
                ("dense_1", nn.Linear(64, 128)),
                ("tanh_1", nn.Tanh()),
                ("dense_2", nn.Linear(128, 128)),
                ("tanh_2", nn.Tanh()),
                ("logits", nn.Linear(128, 10)),
            ]
        )
    )
    with torch.no_grad():
        for name in ("dense_1", "dense_2", "logits"):
            kernel, bias = work.weights[name]
            layer = getattr(model, name)
            layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
            layer.bias.copy_(torch.from_numpy(bias))
    return model.eval()


def restrict(model, workload):
    for name in ("dense_1", "dense_2"):
        for p in getattr(model, name).parameters():
            p.requires_grad_(workload == "B")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main(argv=None):
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            (("--tests-a",), {"type": int, "default": 20, "help": "test points for A-cg"}),
            (("--tests-b",), {"type": int, "default": 4, "help": "test points for B-cg"}),
            (("--cg-maxiter-b",), {"type": int, "default": 200, "help": "CG iterations, B"}),
            (("--b-exact",), {"action": "store_true", "help": "also DirectInfluence on B"}),
        ],
    )
    work = Workload(args.workload)
    try:
        import torch
        from pydvl.influence import InfluenceMode
        from pydvl.influence.torch import CgInfluence, DirectInfluence
    except ImportError as error:  # pragma: no cover - depends on the venv
        Results("pydvl", "?", args.out).not_installable(repr(error))
        return
    from importlib.metadata import version

    torch.manual_seed(0)
    results = Results(
        "pydvl",
        version("pydvl"),
        args.out,
        framework=f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        tag=args.tag,
    )
    model = build_torch_model(torch, work)
    x_train = torch.from_numpy(work.x_train)
    y_train = torch.from_numpy(work.y_train)
    x_test = torch.from_numpy(work.x_test)
    y_test = torch.from_numpy(work.y_test)
    # Warm-up and a check that the weights were loaded in the right layout.
    with torch.no_grad():
        logits = model(x_train)
    loss_value = float(torch.nn.functional.cross_entropy(logits, y_train))
    print(f"pydvl: torch model mean training loss {loss_value:.6f}", flush=True)

    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train),
        batch_size=args.batch_size or work.batch_size,
        shuffle=False,
    )
    loss = torch.nn.functional.cross_entropy
    regularization = 2.0 * work.l2 + work.damping
    settings = {
        "batch_size": loader.batch_size,
        "regularization": regularization,
        "regularisation": "regularization=2*l2+damping added to the whole diagonal "
        "(biases get 2*l2 more than in ours)",
        "dtype": "float32",
    }
    conversion = "ours = -theirs (pyDVL's InfluenceMode.Up is +g_test^T H^-1 g_train, no 1/n)"
    caps = {"A": args.tests_a, "B": args.tests_b}
    plans = [("A", "exact"), ("A", "cg"), ("B", "cg")]
    if args.b_exact:
        plans.append(("B", "exact"))
    for workload, solver in plans:
        if not selected(args, workload, solver):
            continue
        try:
            params = restrict(model, workload)
            k = min(caps[workload] if solver == "cg" else work.n_test, work.n_test)
            with Timer() as total:
                with Timer() as fit:
                    if solver == "exact":
                        infl = DirectInfluence(model, loss, regularization=regularization)
                        detail = (
                            "DirectInfluence: dense Hessian (torch.func.hessian per batch), "
                            "torch.linalg.solve"
                        )
                    elif workload == "A":
                        infl = CgInfluence(model, loss, regularization=regularization)
                        detail = (
                            "CgInfluence, library defaults: rtol=1e-4, atol=1e-6, maxiter=10*p, "
                            "x0=b, one CG per test point (solve_simultaneously=False)"
                        )
                    else:
                        # With the defaults pyDVL's CG stops when |r| < max(rtol**2 * y_k,
                        # atol**2) (y: norms over the *test* axis, so about 1e-12 here), which
                        # float32 never reaches on B: it would run maxiter = 10*p = 261,220
                        # iterations per test point (hours each). We cap the iterations.
                        infl = CgInfluence(
                            model,
                            loss,
                            regularization=regularization,
                            maxiter=args.cg_maxiter_b,
                            warn_on_max_iteration=False,
                        )
                        detail = (
                            f"CgInfluence, rtol=1e-4, atol=1e-6 (defaults, unreachable here), "
                            f"maxiter={args.cg_maxiter_b}, x0=b, one CG per test point"
                        )
                    infl = infl.fit(loader)
                # influences() = influence_factors (solves, one per test point) followed by
                # influences_from_factors (training gradients, dot products); called in two
                # steps so that a capped CG run can be extrapolated honestly.
                with Timer() as solve:
                    factors = infl.influence_factors(x_test[:k], y_test[:k])
                with Timer() as score:
                    values = infl.influences_from_factors(
                        factors, x_train, y_train, mode=InfluenceMode.Up
                    )
                    scores = values.detach().cpu().numpy()
            if k == work.n_test:
                seconds, timing = total.seconds, "measured on the full task"
            else:
                seconds = fit.seconds + solve.seconds * work.n_test / k + score.seconds
                timing = (
                    f"extrapolated to {work.n_test} test points: fit {fit.seconds:.1f} s + "
                    f"{k} CG solves {solve.seconds:.1f} s x {work.n_test}/{k} + scoring "
                    f"{score.seconds:.1f} s"
                )
            results.add(
                workload,
                solver,
                params,
                scores,
                seconds,
                -1.0,
                conversion,
                settings={**settings, "solver": detail},
                seconds_measured=total.seconds,
                timing=timing,
                notes="" if k == work.n_test else f"CG capped: first {k} test points only",
                stages={"fit": fit.seconds, "solve": solve.seconds, "score": score.seconds},
            )
        except Exception as error:  # recorded in the JSON
            results.fail_run(workload, solver, error)


if __name__ == "__main__":
    main()
