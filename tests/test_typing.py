"""Type hints on the public API: every parameter and every return is annotated.

Walks the names users reach (``tfi.__all__``, ``tfi.solvers.__all__``,
``tfi.callbacks.__all__``, ``tfi.engine.__all__``, the public names of
``tfi.evaluation``, ``tfi.distribute`` and the feature modules) and the public
methods and properties of the public classes, with ``inspect.signature``.
``self``/``cls``, ``*args`` and ``**kwargs`` need no annotation; ``__init__`` needs
none for its return.
"""

from __future__ import annotations

import importlib
import inspect
import types

import pytest

import tf_influence as tfi

PACKAGE = "tf_influence"

# Modules whose public names are public API beyond the packages' ``__all__``.
MODULES = [
    "tf_influence.evaluation",
    "tf_influence.distribute",
    "tf_influence.logs",
    "tf_influence.serving",
    "tf_influence.outputs",
    "tf_influence.tracin",
    "tf_influence.index",
]

# Modules that are fully annotated already; a new public name there must be annotated too.
ANNOTATED = [
    "tf_influence.distribute",
    "tf_influence.logs",
    "tf_influence.serving",
    "tf_influence.outputs",
    "tf_influence.tracin",
    "tf_influence.callbacks.tracin_checkpoints",
    "tf_influence.demo",
    "tf_influence.__main__",
    "tf_influence.engine.objective",
    "tf_influence.engine.state",
    "tf_influence.engine.checks",
    "tf_influence.engine.settings",
    "tf_influence.engine.gradients",
    "tf_influence.engine",
    "tf_influence.evaluation",
    "tf_influence.analyses",
    "tf_influence.influence_model",
    "tf_influence.callbacks.influence_callback",
    "tf_influence.solvers.base",
    "tf_influence.solvers.exact",
    "tf_influence.solvers.cg",
    "tf_influence.solvers.krylov",
    "tf_influence.solvers.recycling",
    "tf_influence.solvers.lissa",
    "tf_influence.solvers.arnoldi",
    "tf_influence.solvers.projected",
    "tf_influence.engine.projection",
    "tf_influence.engine.index",
    "tf_influence.engine.jl",
    "tf_influence.solvers",
    "tf_influence.index",
    "tf_influence.index.store",
    "tf_influence.index.stream",
    "tf_influence.index.layout",
    "tf_influence.index.blockio",
    "tf_influence.index.kernels",
]


def _module_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
        ]
    return list(names)


def _public_objects(modules: list[types.ModuleType]) -> dict[str, object]:
    """``{qualified name: function or class}`` for the public names of ``modules``."""
    found = {}
    for module in modules:
        for name in _module_names(module):
            value = getattr(module, name)
            if (inspect.isfunction(value) or inspect.isclass(value)) and getattr(
                value, "__module__", ""
            ).startswith(PACKAGE):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def _members(cls: type) -> dict[str, object]:
    """The public methods and properties of ``cls`` defined in this package (with bases)."""
    members = {}
    for klass in reversed(cls.__mro__):
        if not klass.__module__.startswith(PACKAGE):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name not in ("__init__", "__call__"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property):
                value = value.fget
            if inspect.isfunction(value) and value.__module__.startswith(PACKAGE):
                members[f"{cls.__module__}.{cls.__qualname__}.{name}"] = value
    return members


def _missing(name: str, function) -> list[str]:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    missing = []
    for index, parameter in enumerate(signature.parameters.values()):
        if index == 0 and parameter.name in ("self", "cls"):
            continue
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.annotation is inspect.Parameter.empty:
            missing.append(f"{name}({parameter.name})")
    if not name.endswith(".__init__") and signature.return_annotation is inspect.Signature.empty:
        missing.append(f"{name} -> return")
    return missing


def unannotated(modules: list[types.ModuleType]) -> list[str]:
    """Every public parameter or return of ``modules`` without a type hint."""
    missing = []
    for name, value in sorted(_public_objects(modules).items()):
        if inspect.isclass(value):
            for member, function in sorted(_members(value).items()):
                missing.extend(_missing(member, function))
        else:
            missing.extend(_missing(name, value))
    return sorted(set(missing))


def public_modules() -> list[types.ModuleType]:
    return [tfi, tfi.solvers, tfi.callbacks, tfi.engine] + [
        importlib.import_module(name) for name in MODULES
    ]


def test_checker_sees_missing_hints():
    module = types.ModuleType("tf_influence.fake")

    def documented(x: int, *args, y: str = "", **kwargs) -> int:
        return x

    def bare(x, y: int = 0):
        return x

    class Thing:
        def __init__(self, a: int):
            self.a = a

        def method(self, b) -> None:
            del b

        @property
        def size(self):
            return 1

        def _private(self, c):
            del c

    # Make them look like names defined at the top of a module of the package.
    for value in (documented, bare, Thing):
        value.__module__, value.__qualname__ = module.__name__, value.__name__
        setattr(module, value.__name__, value)
    for value in vars(Thing).values():
        target = value.fget if isinstance(value, property) else value
        if inspect.isfunction(target):
            target.__module__ = module.__name__
            target.__qualname__ = f"Thing.{target.__name__}"
    assert unannotated([module]) == [
        "tf_influence.fake.Thing.method(b)",
        "tf_influence.fake.Thing.size -> return",
        "tf_influence.fake.bare -> return",
        "tf_influence.fake.bare(x)",
    ]


@pytest.mark.parametrize("name", ANNOTATED)
def test_annotated_modules(name):
    module = importlib.import_module(name)
    missing = unannotated([module])
    assert not missing, "Public names without type hints:\n" + "\n".join(missing)


def test_public_api_annotated():
    missing = unannotated(public_modules())
    assert not missing, f"{len(missing)} public names without type hints:\n" + "\n".join(missing)
