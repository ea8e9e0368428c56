"""Writing files atomically: a crash or a kill leaves the old file or the new one, never half.

Also the small JSON records (progress files) that resumable outputs keep beside
their data: written atomically, read back with an error that says how to recover.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable


def atomic_write(path: str, fill: Callable) -> None:
    """Calls ``fill(handle)`` on ``path + ".partial"``, syncs it, then renames it to ``path``.

    If anything fails (a full disk, say), the temporary file is removed and ``path``
    is left as it was.
    """
    temporary = f"{path}.partial"
    try:
        with open(temporary, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def write_record(path: str, record: dict) -> None:
    """Writes the JSON ``record`` to ``path`` atomically."""
    data = json.dumps(record, indent=1).encode()
    atomic_write(path, lambda handle: handle.write(data))


def read_record(path: str, record_format: str, what: str, remedy: str) -> dict:
    """The JSON record at ``path``, checked to be of ``record_format``.

    Args:
        path: the record's file.
        record_format: the value its ``"format"`` entry must have.
        what: what the record is, for messages (e.g. "of an interrupted `explain`").
        remedy: how to start again, for messages (e.g. "Delete it (and x.npy) to start
            again.").

    Raises:
        ValueError: the file cannot be read or parsed, or is of another format.
    """
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"The progress file {path!r} {what} cannot be read ({error}). {remedy}"
        ) from error
    if not isinstance(record, dict) or record.get("format") != record_format:
        received = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{path!r} is not a progress file {what}. Received: format={received!r}. {remedy}"
        )
    return record
