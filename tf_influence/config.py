"""Process-wide settings.

``set_trace_cache(directory)`` keeps the compiled functions of ``fit`` and
``explain`` on disk, so that a new process (a notebook kernel restarted, a script
run again, a callback in a new training run) calls them without tracing again::

    import tf_influence as tfi
    tfi.config.set_trace_cache("~/.cache/tf_influence/traces")

The environment variable ``TF_INFLUENCE_TRACE_CACHE`` does the same without code.
See "Time to a first answer" in the performance docs for what it saves and which
models it applies to.
"""

from __future__ import annotations

import os

from tf_influence.engine import trace_cache


def set_trace_cache(directory: str | os.PathLike | None) -> None:
    """Keeps traces in ``directory`` (created when first written); None turns it off.

    A trace is kept only where it can be reused safely from its description: models
    of built-in Keras layers (``Sequential`` or functional, no ``Lambda``), built-in
    losses and regularisers, and graphs that read nothing but the model's weights.
    Other functions are traced as usual. Entries are keyed by the model's config and
    weight shapes, the argument shapes, the settings, and the versions of Python,
    TensorFlow, Keras and tf-influence, so a changed model or upgrade never reuses a
    stale trace; deleting the folder is always safe.

    Args:
        directory: a folder path (``~`` is expanded), or None to stop keeping and
            reading traces (the environment variable is then ignored too).

    Raises:
        TypeError: ``directory`` is not a path or None.
        ValueError: ``directory`` names an existing file.
    """
    if isinstance(directory, (str, os.PathLike)):
        directory = os.path.expanduser(os.fspath(directory))
    trace_cache.set_directory(directory)


def trace_cache_directory() -> str | None:
    """The folder traces are kept in: the one set, else ``$TF_INFLUENCE_TRACE_CACHE``, else None."""
    return trace_cache.directory()


__all__ = ["set_trace_cache", "trace_cache_directory"]
