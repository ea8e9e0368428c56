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


@dataclasses.dataclass(frozen=True)
class Settings:
    """What ``InfluenceModel.compile`` chose (see its docstring for each field).

    Attributes:
        solver: the ``tfi.solvers.Solver`` instance.
        damping: the float added to the curvature's diagonal, or ``"auto"`` (chosen
            from the curvature's spectrum at ``fit``, see ``tf_influence.engine.damping``).
        curvature: ``"hessian"`` or ``"gauss_newton"``.
        hvp: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.
        scoring: ``"auto"``, ``"jvp"`` or ``"jacobian"``.
        jit_compile: compile per-batch products and gradients with XLA.
    """

    solver: solvers_lib.Solver = dataclasses.field(default_factory=lambda: solvers_lib.get("cg"))
    damping: float | str = 0.0
    hvp: str = "auto"
    scoring: str = "auto"
    jit_compile: bool = False
    curvature: str = "hessian"

    def __post_init__(self) -> None:
        object.__setattr__(self, "solver", solvers_lib.get(self.solver))
        object.__setattr__(self, "damping", check_damping(self.damping))
        check_hvp_mode(self.hvp)
        check_scoring_mode(self.scoring)
        object.__setattr__(self, "jit_compile", check_bool("jit_compile", self.jit_compile))
        check_curvature(self.curvature)

    def to_config(self) -> dict[str, Any]:
        """Plain JSON values: the solver as ``{"class_name", "config"}``.

        ``curvature`` is listed when it is not the default ``"hessian"``, so records
        written before it existed (saved states, resume fingerprints, exports) read
        the same.
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
        if isinstance(values.get("solver"), dict):
            values["solver"] = solvers_lib.deserialize(values["solver"])
        return cls(**values)
