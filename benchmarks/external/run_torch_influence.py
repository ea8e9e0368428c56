"""Influence of the digits workload with ``torch-influence`` (alstonlo/torch-influence).

Run with the torch venv (see setup_envs.sh)::

    /tmp/bench-torch/bin/python -m benchmarks.external.run_torch_influence \
        --workload /tmp/bench/workload.npz --out /tmp/bench/results

torch-influence is not on PyPI (``pip install torch-influence``: "No matching
distribution found"); its README installs it from a git clone, and this machine
reaches only PyPI. When the import fails the script records "not installable
here" with the pip error that setup_envs.sh saved (``--pip-log``). The code
below follows the library's documented API (``BaseObjective``,
``AutogradInfluenceModule``, ``CGInfluenceModule``, ``influences``) but has NOT
been run here.

What torch-influence computes: ``influences(train_idxs, [i])[j] =
grad_train(z_j) . H^-1 grad L(z_test_i) / n`` (the estimated change of the test
loss when z_j is removed), with ``H`` the Hessian of the mean training loss plus
``train_regularization`` plus ``damp * I``. So ``ours = -n * theirs``. One
difference it keeps by design: its training gradient is that of ``train_loss``,
which includes the regularizer, i.e. ``grad L(z_j) + 2*l2*W`` where ours is
``grad L(z_j)``; agreement is therefore not expected to be exact.
"""

from __future__ import annotations

import os

import numpy as np

from benchmarks.external.common import Results, Timer, Workload, parse_args, selected
from benchmarks.external.run_pydvl import build_torch_model, restrict


def reason_from_log(path):
    if path and os.path.exists(path):
        with open(path) as handle:
            errors = [line.strip() for line in handle if line.startswith("ERROR")]
        if errors:
            return " / ".join(errors)
    return "torch_influence cannot be imported"


def main(argv=None):
    args = parse_args(
        __doc__.splitlines()[0],
        argv,
        extra=[
            (
                ("--pip-log",),
                {"default": "/tmp/bench-torch/torch-influence-pip.log", "help": "pip output"},
            ),
        ],
    )
    work = Workload(args.workload)
    try:
        import torch
        import torch.nn.functional as F
        from torch_influence import AutogradInfluenceModule, BaseObjective, CGInfluenceModule
    except ImportError as error:
        reason = reason_from_log(args.pip_log)
        Results("torch-influence", "-", args.out).not_installable(
            f"{reason} (pip name torch-influence; the project installs from a git clone of "
            f"GitHub, which this machine cannot reach; import said: {error})"
        )
        return
    from importlib.metadata import version

    results = Results(
        "torch-influence", version("torch_influence"), args.out, f"torch {torch.__version__}"
    )
    model = build_torch_model(torch, work)
    dataset = torch.utils.data.TensorDataset(
        torch.from_numpy(work.x_train), torch.from_numpy(work.y_train)
    )
    tests = torch.utils.data.TensorDataset(
        torch.from_numpy(work.x_test), torch.from_numpy(work.y_test)
    )
    bs = args.batch_size or work.batch_size
    train_loader = torch.utils.data.DataLoader(dataset, batch_size=bs, shuffle=False)
    test_loader = torch.utils.data.DataLoader(tests, batch_size=work.n_test, shuffle=False)

    for workload, solver in (("A", "exact"), ("A", "cg"), ("B", "cg")):
        if not selected(args, workload, solver):
            continue
        try:
            params = restrict(model, workload)
            # 1 on kernel entries of the flattened trainable parameters, 0 on biases.
            mask = torch.cat(
                [
                    torch.full((p.numel(),), 1.0 if name.endswith("weight") else 0.0)
                    for name, p in model.named_parameters()
                    if p.requires_grad
                ]
            )

            class Objective(BaseObjective):
                kernel_mask = mask

                def train_outputs(self, model, batch):
                    return model(batch[0])

                def train_loss_on_outputs(self, outputs, batch):
                    return F.cross_entropy(outputs, batch[1])

                def train_regularization(self, flat_params):
                    return work.l2 * torch.sum(self.kernel_mask * flat_params**2)

                def test_loss(self, model, flat_params, batch):
                    return F.cross_entropy(model(batch[0]), batch[1])

            common = dict(
                model=model,
                objective=Objective(),
                train_loader=train_loader,
                test_loader=test_loader,
                device=torch.device("cpu"),
                damp=work.damping,
            )
            with Timer() as timer:
                if solver == "exact":
                    module = AutogradInfluenceModule(**common)
                else:
                    module = CGInfluenceModule(**common, atol=1e-8, maxiter=1000)
                all_train = list(range(work.n_train))
                scores = np.stack(
                    [module.influences(all_train, [i]).numpy() for i in range(work.n_test)]
                )
            results.add(
                workload,
                solver,
                params,
                scores,
                timer.seconds,
                -float(work.n_train),
                "ours = -n * theirs (torch-influence returns g_train . H^-1 g_test / n)",
                settings={
                    "batch_size": bs,
                    "solver": "AutogradInfluenceModule (torch.inverse)"
                    if solver == "exact"
                    else "CGInfluenceModule (scipy cg, atol=1e-8, maxiter=1000)",
                    "regularisation": "train_regularization = l2 * sum(kernel**2), damp=1e-3",
                },
            )
        except Exception as error:  # recorded in the JSON
            results.fail_run(workload, solver, error)


if __name__ == "__main__":
    main()
