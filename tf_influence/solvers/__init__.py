"""Inverse Hessian-vector-product solvers: ``(operator, rhs) -> (solution, diagnostics)``."""

from tf_influence.solvers.arnoldi import Arnoldi
from tf_influence.solvers.base import CurvatureError, Diagnostics, Solver
from tf_influence.solvers.cg import CG
from tf_influence.solvers.exact import Exact
from tf_influence.solvers.lissa import LiSSA

__all__ = [
    "Arnoldi",
    "CG",
    "CurvatureError",
    "Diagnostics",
    "Exact",
    "LiSSA",
    "Solver",
    "deserialize",
    "get",
    "serialize",
]

_BY_NAME = {"exact": Exact, "cg": CG, "lissa": LiSSA, "arnoldi": Arnoldi}


def get(identifier) -> Solver:
    """A solver from its name (``"exact"``, ``"cg"``, ``"lissa"``, ``"arnoldi"``) or an instance."""
    if isinstance(identifier, Solver):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    raise ValueError(
        f"Argument `solver` must be one of {sorted(_BY_NAME)} or a tf_influence.solvers.Solver "
        f"instance. Received: solver={identifier!r}"
    )


def serialize(solver: Solver) -> dict:
    """``{"class_name": ..., "config": ...}``, plain JSON types (see ``deserialize``)."""
    return {"class_name": type(solver).__name__, "config": solver.get_config()}


def deserialize(config) -> Solver:
    """Rebuilds a solver from ``serialize``'s output."""
    classes = {cls.__name__: cls for cls in _BY_NAME.values()}
    if not isinstance(config, dict) or config.get("class_name") not in classes:
        raise ValueError(
            f"Cannot rebuild a solver from {config!r}: expected a dict with a `class_name` in "
            f"{sorted(classes)} and a `config`."
        )
    return classes[config["class_name"]].from_config(config.get("config", {}))
