"""Writing files atomically: a crash or a kill leaves the old file or the new one, never half."""

from __future__ import annotations

import os
from collections.abc import Callable


def atomic_write(path: str, fill: Callable) -> None:
    """Calls ``fill(handle)`` on ``path + ".partial"``, syncs it, then renames it to ``path``."""
    temporary = f"{path}.partial"
    with open(temporary, "wb") as handle:
        fill(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
