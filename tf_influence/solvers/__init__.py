"""Inverse curvature-vector-product solvers: ``(operator, rhs) -> (solution, diagnostics)``.

Every solver implements the protocol of ``tfi.solvers.Solver`` (see
``tf_influence.solvers.base``). A new one plugs in with ``register``: it is then
found by name in ``InfluenceModel.compile(solver=...)`` and by class name when a
saved state is loaded.
"""

from __future__ import annotations

from tf_influence.solvers.arnoldi import Arnoldi
from tf_influence.solvers.base import (
    CurvatureError,
    CurvatureOperator,
    Diagnostics,
    IndexInverse,
    LowRankInverse,
    LowRankQueries,
    Projection,
    Solver,
)
from tf_influence.solvers.cg import CG
from tf_influence.solvers.ekfac import EKFAC, KFAC
from tf_influence.solvers.exact import Exact
from tf_influence.solvers.lissa import LiSSA
from tf_influence.solvers.projected import Projected

__all__ = [
    "Arnoldi",
    "CG",
    "CurvatureError",
    "CurvatureOperator",
    "Diagnostics",
    "EKFAC",
    "Exact",
    "IndexInverse",
    "KFAC",
    "LiSSA",
    "LowRankInverse",
    "LowRankQueries",
    "Projected",
    "Projection",
    "Solver",
    "deserialize",
    "get",
    "register",
    "serialize",
]

_BY_NAME: dict[str, type[Solver]] = {}


def register(name: str, cls: type[Solver]) -> type[Solver]:
    """Makes a solver class known by ``name`` (for ``compile``) and by class name (for ``load``).

    Args:
        name: the lower-case name ``compile(solver=name)`` accepts, e.g. ``"ekfac"``.
        cls: a subclass of ``tfi.solvers.Solver`` whose constructor has defaults
            for every argument.

    Returns:
        ``cls``, so that ``register`` can decorate a class definition.

    Raises:
        ValueError: ``name`` is not a lower-case identifier, ``cls`` is not a
            ``Solver`` subclass, or the name is taken by another class.

    Example:
        >>> tfi.solvers.register("diagonal", DiagonalSolver)
        >>> im.compile(solver="diagonal")
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(
            f"Argument `name` must be a lower-case identifier such as 'ekfac'. Received: "
            f"name={name!r}"
        )
    if not (isinstance(cls, type) and issubclass(cls, Solver)):
        raise ValueError(
            f"Argument `cls` must be a subclass of tf_influence.solvers.Solver. Received: "
            f"cls={cls!r}"
        )
    known = _BY_NAME.get(name)
    if known is not None and known is not cls:
        raise ValueError(
            f"Argument `name` is already registered for {known.__module__}.{known.__name__}. "
            f"Received: name={name!r} for {cls.__module__}.{cls.__name__}. Choose another name."
        )
    _BY_NAME[name] = cls
    return cls


for _name, _cls in (
    ("exact", Exact),
    ("cg", CG),
    ("lissa", LiSSA),
    ("arnoldi", Arnoldi),
    ("kfac", KFAC),
    ("ekfac", EKFAC),
    ("projected", Projected),
):
    register(_name, _cls)


def get(identifier: str | Solver) -> Solver:
    """A solver from its registered name (``"exact"``, ``"cg"``, ...) or an instance."""
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


def deserialize(config: dict) -> Solver:
    """Rebuilds a solver from ``serialize``'s output (its class must be registered)."""
    classes = {cls.__name__: cls for cls in _BY_NAME.values()}
    if not isinstance(config, dict) or config.get("class_name") not in classes:
        raise ValueError(
            f"Cannot rebuild a solver from {config!r}: expected a dict with a `class_name` in "
            f"{sorted(classes)} and a `config`. Register the solver's class with "
            "`tfi.solvers.register(name, cls)` before loading."
        )
    return classes[config["class_name"]].from_config(config.get("config", {}))
