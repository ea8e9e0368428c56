"""The engine under ``InfluenceModel``: objective, data, curvature, gradients, fitted state.

Most users never import from here. It is the layer that solvers and new curvature
kinds are written against (see the "Extending" page of the docs)::

    objective  ->  curvature  ->  solvers (protocol)  ->  fitted state  ->  InfluenceModel
                   gradients (per-example, factored) ------^

* ``Objective``: what ``model.fit`` minimised (per-example loss, regularisation,
  which variables, inference mode).
* ``ExampleData``: training or test examples in a fixed order, batched.
* ``HessianOperator``: the matrix-free ``v -> (H + damping*I) v`` over the data.
* ``GaussNewtonOperator``: the same with the generalised Gauss-Newton matrix
  (``compile(curvature="gauss_newton")``).
* ``PerExampleGradients``: per-example gradients and training scores.
"""

from tf_influence.engine.curvature import HessianOperator
from tf_influence.engine.data import ExampleData
from tf_influence.engine.gauss_newton import GaussNewtonOperator
from tf_influence.engine.gradients import PerExampleGradients
from tf_influence.engine.objective import Objective

__all__ = [
    "ExampleData",
    "GaussNewtonOperator",
    "HessianOperator",
    "Objective",
    "PerExampleGradients",
]
