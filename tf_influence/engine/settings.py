"""The one settings record of an ``InfluenceModel``: what ``compile`` chose.

``Settings`` is frozen and validated when it is made. It feeds everything that
depends on the configuration: the fitted state, ``save``/``load``, the
fingerprints that guard a resumed ``explain(output=)``, and ``export``. Its plain
dict form is ``InfluenceModel.get_compile_config()``, and
``InfluenceModel.compile_from_config(config)`` rebuilds it, as in Keras.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tf_influence import solvers as solvers_lib
from tf_influence._validation import check_bool
from tf_influence.engine.curvature import check_curvature, check_hvp_mode
from tf_influence.engine.gradients import check_scoring_mode


def check_damping(damping: Any, allow_auto: bool = True) -> float | str:
    """``damping`` as a float (or ``"auto"``), or a ValueError that says what is allowed."""
    if allow_auto and isinstance(damping, str) and damping == "auto":
        return "auto"
    try:
        value = float(damping)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(damping, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(
            "Argument `damping` must be a finite number >= 0. Received: "
            f"damping={damping!r}. Use 0.0 for a convex model, or a small positive value "
            "such as 1e-3 otherwise"
            + (
                ', or "auto" to choose it from the curvature\'s spectrum at `fit`.'
                if allow_auto
                else "."
            )
        )
    return value


def resolve_curvature(curvature: Any, damping: Any, solver: Any = None) -> str:
    """The curvature ``compile`` uses: ``curvature`` itself, or the default for ``damping``.

    ``curvature=None`` (the default of ``compile`` and ``InfluenceCallback``) takes
    ``"gauss_newton"`` when ``damping`` is ``"auto"`` (the default) and ``"hessian"``
    when ``damping`` is a number. So ``compile()`` with no argument answers on a network
    in the middle of training, whose Hessian is indefinite; a damping given by hand
    keeps the Hessian it was tuned for; and a model whose outputs are linear in its
    parameters (linear or logistic regression: the convex models) gets its Hessian
    either way, which is what the Gauss-Newton matrix equals there. The evidence is in
    ``docs/solvers.md`` ("The defaults", ``python -m benchmarks.defaults``).

    A solver that approximates one curvature (``Solver.curvature``: K-FAC and EK-FAC
    approximate Gauss-Newton) takes it whatever the damping, and refuses another.

    Args:
        curvature: ``"hessian"``, ``"gauss_newton"`` or None.
        damping: the ``damping`` of ``compile`` (a number or ``"auto"``).
        solver: the solver, or None.

    Returns:
        ``"hessian"`` or ``"gauss_newton"``.

    Raises:
        ValueError: an unknown curvature name, or one the solver does not approximate.
    """
    fixed = getattr(solver, "curvature", None)
    if fixed is not None:
        if curvature not in (None, fixed):
            raise ValueError(
                f"The solver {type(solver).__name__} approximates the {fixed!r} curvature. "
                f"Received: curvature={curvature!r}. Leave `curvature` out (or pass "
                f"curvature={fixed!r}) with this solver."
            )
        curvature = fixed
    if curvature is None:
        return "gauss_newton" if isinstance(damping, str) and damping == "auto" else "hessian"
    return check_curvature(curvature)


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``InfluenceModel.compile`` chose (see its docstring for each field).

    Attributes:
        solver: the ``tfi.solvers.Solver`` instance.
        damping: the float added to the curvature's diagonal, or ``"auto"`` (the
            default: chosen from the curvature's spectrum at ``fit``, see
            ``tf_influence.engine.damping``).
        curvature: ``"hessian"`` or ``"gauss_newton"``; None (the default) is resolved
            when the record is made (``resolve_curvature``): Gauss-Newton with
            ``damping="auto"``, the Hessian with a number.
        hvp: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.
        scoring: ``"auto"``, ``"jvp"`` or ``"jacobian"``.
        jit_compile: compile per-batch products and gradients with XLA.
    """

    solver: solvers_lib.Solver = dataclasses.field(default_factory=lambda: solvers_lib.get("cg"))
    damping: float | str = "auto"
    hvp: str = "auto"
    scoring: str = "auto"
    jit_compile: bool = False
    curvature: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", solvers_lib.get(self.solver))
        object.__setattr__(self, "damping", check_damping(self.damping))
        check_hvp_mode(self.hvp)
        check_scoring_mode(self.scoring)
        object.__setattr__(self, "jit_compile", check_bool("jit_compile", self.jit_compile))
        object.__setattr__(
            self, "curvature", resolve_curvature(self.curvature, self.damping, self.solver)
        )

    def to_config(self) -> dict[str, Any]:
        """Plain JSON values: the solver as ``{"class_name", "config"}``.

        ``curvature`` is listed when it is not ``"hessian"``, so records written
        before it existed (saved states, resume fingerprints, exports) read the same;
        ``from_config`` reads a record without it as ``"hessian"``, whatever the
        damping.
        """
        config = {
            "solver": solvers_lib.serialize(self.solver),
            "damping": self.damping,
            "hvp": self.hvp,
            "scoring": self.scoring,
            "jit_compile": self.jit_compile,
        }
        if self.curvature != "hessian":
            config["curvature"] = self.curvature
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Settings:
        """Rebuilds the record from ``to_config``'s output (unknown keys are refused)."""
        if not isinstance(config, dict):
            raise ValueError(
                "Argument `config` must be a dict from `get_compile_config()`. Received: "
                f"config={config!r}"
            )
        unknown = sorted(set(config) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"Argument `config` has unknown keys {unknown}. Received: config={config!r}. "
                "Pass the dict `get_compile_config()` returned."
            )
        values = dict(config)
        # A record without `curvature` was written for the Hessian (see `to_config`),
        # also when it was written before the default became the damping's choice.
        values.setdefault("curvature", "hessian")
        if isinstance(values.get("solver"), dict):
            values["solver"] = solvers_lib.deserialize(values["solver"])
        return cls(**values)
