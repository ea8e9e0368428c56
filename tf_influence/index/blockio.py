"""Block reads and writes of ``.npy`` files with ``os.pwrite`` / ``os.preadv``, no memory map.

A memory map would be simpler, but every page of a mapped file that the process
touched counts in its resident memory until the kernel evicts it: streaming a 2 GB
store through ``np.memmap`` shows a 2 GB process. Reading into one reused buffer
keeps the resident memory at one block, whatever the file's size (the file's pages
still sit in the page cache, shared and not counted against the process).
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator

import numpy as np

from tf_influence._validation import check_positive_int
from tf_influence.index import kernels

# Default memory for one block of a read (bytes): bounds the RAM of every stream.
BLOCK_BYTES = 16 * 2**20


def size_text(nbytes: float) -> str:
    """``"812 bytes"``, ``"3.1 MiB"``, ``"1.9 GiB"``."""
    for unit in ("bytes", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "bytes" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` is written at ``offset``."""
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def pread_all(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fills ``buffer`` from ``offset`` of the file (``os.preadv``, no extra copy)."""
    while len(buffer):
        read = os.preadv(fd, [buffer], offset)
        if read == 0:
            raise ValueError(
                f"{path!r} is shorter than its header says: the gradient store is damaged. "
                "Delete it and build it again."
            )
        buffer, offset = buffer[read:], offset + read


def choose_block_rows(block_rows: int | None, num_rows: int, bytes_per_row: int) -> int:
    """``block_rows`` checked, or the rows that fit in ``BLOCK_BYTES``; at most ``num_rows``."""
    if block_rows is None:
        block_rows = max(1, BLOCK_BYTES // max(1, bytes_per_row))
    else:
        block_rows = check_positive_int("block_rows", block_rows, True, none_means="automatic")
    return min(block_rows, num_rows)


def read_blocks(
    files: list[tuple[str, tuple[int, ...], np.dtype]],
    offsets: list[int],
    num_rows: int,
    block_rows: int,
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """``(start, count, rows, scales)`` of a store's files, into two reused aligned buffers.

    Args:
        files: ``(path, shape, dtype)`` of the rows' file, then (if scaled) the
            scales' file.
        offsets: where each file's data starts.
        num_rows: n.
        block_rows: rows per buffer; the last block fills only ``count`` of them.
    """
    _, (_, dim), dtype = files[0]
    block = kernels.aligned_empty((block_rows, dim), dtype)
    scales = kernels.aligned_empty((block_rows,), np.float32)
    scales[:] = 1  # a float32 store has no scales file
    views = [memoryview(block).cast("B"), memoryview(scales).cast("B")][: len(files)]
    fds = [os.open(path, os.O_RDONLY) for path, _, _ in files]
    try:
        for start in range(0, num_rows, block_rows):
            count = min(block_rows, num_rows - start)
            for fd, offset, view, (path, _, _) in zip(fds, offsets, views, files, strict=True):
                row_bytes = view.nbytes // block_rows
                pread_all(fd, view[: count * row_bytes], offset + start * row_bytes, path)
            yield start, count, block, scales
    finally:
        for fd in fds:
            os.close(fd)


def write_error(
    error: OSError,
    path: str,
    record_path: str,
    rows: tuple[int, int],
    recorded: int,
    needed: int,
    remaining: int,
) -> OSError:
    """The ``OSError`` (same ``errno``) that says what failed, what is kept and how to resume.

    Args:
        error: what ``os.pwrite`` or ``os.fsync`` raised.
        path: the store's rows file.
        record_path: its progress file.
        rows: ``(start, stop)`` of the rows being written.
        recorded: the rows safely on disk and recorded (the resume point).
        needed: bytes of the block being written.
        remaining: bytes still to write to finish the store.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = size_text(shutil.disk_usage(directory).free)
    except OSError:  # pragma: no cover
        free = "unknown"
    start, stop = rows
    kept = (
        f"Rows 0:{recorded} are kept in the file and recorded in {record_path!r}; nothing "
        "written before is lost"
    )
    resume = f"then run the build again with the same arguments: it resumes at row {recorded}."
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        message = (
            f"The disk is full: writing rows {start}:{stop} of the gradient store {path!r} "
            f"needed {size_text(needed)}, and finishing the store needs {size_text(remaining)} "
            f"({free} free in {directory!r}; the system said: {error.strerror}). {kept}. Free "
            f"at least {size_text(remaining)}, {resume} (Or build in a bigger place with "
            "another path, from the start.)"
        )
    else:
        message = (
            f"Writing rows {start}:{stop} of the gradient store {path!r} failed: {error}. "
            f"{kept}. Fix the cause, {resume}"
        )
    return OSError(error.errno, message)
