"""A resumable, fingerprinted file of projected training gradients, written block by block.

``layout.py`` lists the files (rows, per-row scales for float16, the record,
extra arrays). Rows are written with ``os.pwrite`` in row order; at most every
``CHECKPOINT_SECONDS`` (and at the end) they are synced to disk (``os.fsync``) and
only then is the record replaced atomically, so it never claims a row that is
not on disk.

Resuming: ``GradientStore(path, fingerprints, num_rows, dim, dtype)`` on an
existing record checks that every fingerprint and the layout are equal and goes on
from ``rows_written``; any difference is refused with an error that names it.
Rewriting rows from the recorded count gives the same bytes as an uninterrupted
build, whatever a killed process left after it.

A failed write (a full disk, say) raises an ``OSError`` (same ``errno``) that says
so, with the path, the space needed and free, and how to resume; the rows written
before stay on disk and recorded.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import numpy as np

from tf_influence._errors import describe, first_nonfinite_index
from tf_influence._files import atomic_write
from tf_influence._fingerprint import differing
from tf_influence._validation import check_int, check_positive_int
from tf_influence.index import blockio, kernels
from tf_influence.index.layout import DTYPES, StoreLayout, check_path

# Sync the rows and rewrite the record at most this often (seconds); 0: every write.
CHECKPOINT_SECONDS = 1.0


class GradientStore:
    """``(num_rows, dim)`` projected training gradients in a ``.npy`` file, written block by block.

    Creates the store, or reopens it to resume when its record holds the same
    fingerprints and layout. Rows are written in order (``write``), then
    ``finish`` marks the store complete; ``GradientStore.open`` reopens a complete
    store read-only for queries (``tf_influence.index.stream_top_k`` and friends).

    Args:
        path: the ``.npy`` file of the rows; the other files go beside it.
        fingerprints: ``name -> digest`` of everything the rows depend on (weights,
            training data, projection seed, settings).
        num_rows: the number of rows, n (training examples).
        dim: the length of each row (the projected dimension).
        dtype: ``"float16"`` (default: half the file and the query time of float32,
            see ``docs/index_store.md``), stored with a float32 scale per row, or
            ``"float32"``.

    Raises:
        ValueError: a bad argument; or the record at ``path`` was made with other
            fingerprints or layout (the message names them); or ``path`` exists and
            is not a gradient store.

    Example:
        >>> store = GradientStore("index.npy", {"weights": w, "data": d}, n, 1024)
        >>> for start in range(store.rows_written, n, 4096):
        ...     store.write(start, rows_of(start, min(start + 4096, n)))
        >>> store.finish()
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fingerprints: dict[str, str],
        num_rows: int,
        dim: int,
        dtype: str = "float16",
    ):
        path = check_path(path)
        if not isinstance(fingerprints, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in fingerprints.items()
        ):
            raise ValueError(
                "Argument `fingerprints` must be a dict of str names to str digests. "
                f"Received: fingerprints={describe(fingerprints)}"
            )
        if dtype not in DTYPES:
            raise ValueError(
                f"Argument `dtype` must be one of {list(DTYPES)}. Received: dtype={dtype!r}"
            )
        num_rows = check_positive_int("num_rows", num_rows)
        dim = check_positive_int("dim", dim)
        self._layout = StoreLayout(path, num_rows, dim, np.dtype(dtype))
        self._fingerprints = dict(fingerprints)
        self._read_only = False
        if os.path.exists(self._layout.record_path):
            record = self._layout.read_record()
            differ = differing(record.get("fingerprints", {}), self._fingerprints)
            differ += self._layout.differences(record)
            if differ:
                raise ValueError(
                    f"Argument `path` refers to a gradient store ({path!r}, "
                    f"{record.get('rows_written')} of {record.get('num_rows')} rows written"
                    f"{', complete' if record.get('complete') else ''}) made with other: "
                    f"{', '.join(differ)}. Rows of two different builds are never mixed. "
                    f"Build exactly as before to resume it, or {self._layout.remedy}."
                )
        elif os.path.exists(path):
            raise ValueError(
                "Argument `path` names an existing file that is not a gradient store (there "
                f"is no {self._layout.record_path!r}). Received: path={path!r}. Delete it or "
                "choose another path."
            )
        else:
            # A missing folder is created, as Keras's ModelCheckpoint does.
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._layout.warn_if_too_big()
            # The record first: a kill from here on leaves a store of 0 rows.
            self._layout.write_record(self._fingerprints, 0, False, {})
            record = {"rows_written": 0, "complete": False}
        self._load(record)
        if not self._complete:
            self._fds = [os.open(file, os.O_RDWR) for file, _, _ in self._layout.files()]

    def _load(self, record: dict) -> None:
        self._rows_written = self._recorded = int(record["rows_written"])
        self._complete = bool(record["complete"])
        self._extras = dict(record.get("extras", {}))
        self._fds: list[int] = []
        self._last_checkpoint = 0.0
        if self._rows_written == 0 and not self._complete and not self._read_only:
            self._layout.create()  # new, or killed before its first rows were recorded
        self._offsets = self._layout.offsets()

    @classmethod
    def open(
        cls, path: str | os.PathLike, fingerprints: dict[str, str] | None = None
    ) -> GradientStore:
        """A complete store, read-only (for queries).

        Args:
            path: the store's ``.npy`` file.
            fingerprints: if given, each must equal the store's (a store of other
                weights, data or projection is refused, naming what differs).

        Raises:
            ValueError: there is no store at ``path``, it is not complete, or its
                fingerprints differ from ``fingerprints``.
        """
        path = check_path(path)
        layout = StoreLayout(path, 1, 1, np.dtype(np.float32))
        if not os.path.exists(layout.record_path):
            raise ValueError(
                f"Argument `path` names no gradient store: {layout.record_path!r} does not "
                f"exist. Received: path={path!r}. Build the store first."
            )
        record = layout.read_record()
        store = cls.__new__(cls)
        store._layout = StoreLayout(
            path, int(record["num_rows"]), int(record["dim"]), np.dtype(record["dtype"])
        )
        store._fingerprints = dict(record["fingerprints"])
        store._read_only = True
        store._load(record)
        store._check_complete()
        differ = [] if fingerprints is None else differing(store._fingerprints, fingerprints)
        if differ:
            raise ValueError(
                f"The gradient store {path!r} was built for other: {', '.join(differ)}. Build "
                f"a store for these: {layout.remedy}."
            )
        return store

    # -- what it is ---------------------------------------------------------------------
    @property
    def path(self) -> str:
        """The ``.npy`` file of the rows."""
        return self._layout.path

    @property
    def num_rows(self) -> int:
        """n, the number of rows."""
        return self._layout.num_rows

    @property
    def dim(self) -> int:
        """The length of a row."""
        return self._layout.dim

    @property
    def dtype(self) -> str:
        """``"float16"`` or ``"float32"``, as stored."""
        return self._layout.dtype.name

    @property
    def rows_written(self) -> int:
        """Rows written so far: where a build goes on."""
        return self._rows_written

    @property
    def complete(self) -> bool:
        """Whether ``finish`` was called."""
        return self._complete

    @property
    def fingerprints(self) -> dict[str, str]:
        """``name -> digest`` of what the rows depend on (a copy)."""
        return dict(self._fingerprints)

    def __repr__(self) -> str:
        state = "complete" if self._complete else f"{self._rows_written} rows written"
        return (
            f"GradientStore({self.path!r}, num_rows={self.num_rows}, dim={self.dim}, "
            f"dtype={self.dtype!r}, {state})"
        )

    # -- writing ------------------------------------------------------------------------
    def _check_writable(self, what: str) -> None:
        if self._read_only:
            raise ValueError(
                f"`{what}` needs a store opened for building; GradientStore.open gives a "
                f"read-only one. Create it with GradientStore({self.path!r}, fingerprints, "
                "num_rows, dim, dtype) to write."
            )

    def write(self, start: int, block: np.ndarray) -> None:
        """Writes rows ``start:start + len(block)``; ``start`` must equal ``rows_written``.

        The rows reach the file at once; at most every ``CHECKPOINT_SECONDS`` (and with
        the last row) they are synced and the record is replaced atomically.

        Args:
            start: the first row's index; rows are written in order, each once.
            block: ``(b, dim)`` real rows (cast to float32, then to the store's
                dtype, float16 with a per-row scale).

        Raises:
            ValueError: a bad ``start`` or ``block`` (wrong shape, NaN or inf rows,
                beyond ``num_rows``), or a complete or read-only store.
            OSError: the write failed (a full disk, ...): the message says what to
                free and how to resume; rows written before are kept and recorded.
        """
        self._check_writable("write")
        start = check_int("start", start)
        if self._complete or start != self._rows_written:
            raise ValueError(
                f"Argument `start` must equal `rows_written` ({self._rows_written}): rows are "
                f"written in order, each once{' (the store is complete)' * self._complete}. "
                f"Received: start={start}. Resume from store.rows_written."
            )
        values = np.asarray(block)
        left = self.num_rows - start
        real_rows = values.ndim == 2 and values.shape[1] == self.dim and values.dtype.kind in "fiu"
        if not real_rows or not 1 <= len(values) <= left:
            raise ValueError(
                f"Argument `block` must be a real (rows, {self.dim}) array of 1 to {left} rows "
                f"(rows {start}:{self.num_rows} remain). Received: block={describe(block)}"
            )
        values = values.astype(np.float32, copy=False)
        bad = first_nonfinite_index(values)
        if bad is not None:
            raise ValueError(
                f"Argument `block` holds NaN or inf in row {start + bad} of the store (row "
                f"{bad} of the block). Received: block={describe(block)}. Check the model's "
                "loss and gradients at that training example."
            )
        stop = start + len(values)
        try:
            for fd, offset, part in zip(
                self._fds, self._offsets, self._layout.encode(values), strict=True
            ):
                row_bytes = part.nbytes // len(values)
                blockio.pwrite_all(fd, memoryview(part).cast("B"), offset + start * row_bytes)
        except OSError as error:
            self._failed(error, start, stop)
        self._rows_written = stop
        self.flush(force=stop == self.num_rows)

    def flush(self, force: bool = True) -> None:
        """Syncs the rows written so far and records them (throttled unless ``force``).

        ``write`` calls it; call it yourself before a pause, or in an ``except`` block.
        """
        self._check_writable("flush")
        now = time.monotonic()
        if self._complete or self._recorded == self._rows_written:
            return
        if force or now - self._last_checkpoint >= CHECKPOINT_SECONDS:
            try:
                self._sync_and_record(self._rows_written)
            except OSError as error:
                self._failed(error, self._recorded, self._rows_written)
            self._last_checkpoint = now

    def _sync_and_record(self, rows: int, complete: bool = False) -> None:
        for fd in self._fds:
            os.fsync(fd)
        self._layout.write_record(self._fingerprints, rows, complete, self._extras)
        self._recorded = rows

    def _failed(self, error: OSError, start: int, stop: int) -> None:
        """Records what is safely on disk, then raises an error that says how to resume."""
        if start > self._recorded:
            try:
                self._sync_and_record(start)
            except OSError:
                pass  # the record keeps its older, smaller count
        self._rows_written = self._recorded
        raise blockio.write_error(
            error,
            self.path,
            self._layout.record_path,
            (start, stop),
            self._recorded,
            (stop - start) * self._layout.row_bytes,
            (self.num_rows - self._recorded) * self._layout.row_bytes,
        ) from error

    def finish(self) -> None:
        """Syncs the last rows and marks the store complete (no more writes).

        Raises:
            ValueError: rows are missing (the message says which).
            OSError: syncing or recording failed (see ``write``).
        """
        self._check_writable("finish")
        if self._complete:
            return
        if self._rows_written != self.num_rows:
            raise ValueError(
                f"The gradient store {self.path!r} is not full: rows "
                f"{self._rows_written}:{self.num_rows} are not written. Write them before "
                "`finish`."
            )
        try:
            self._sync_and_record(self.num_rows, complete=True)
        except OSError as error:
            self._failed(error, self._recorded, self._rows_written)
        self._complete = True
        self.close()

    def close(self) -> None:
        """Records the rows written so far (see ``flush``) and closes the files."""
        if self._fds and not self._complete:
            self.flush()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> GradientStore:
        return self

    def __del__(self):
        for fd in getattr(self, "_fds", ()):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- extra arrays ---------------------------------------------------------------------
    def write_extra(self, name: str, array: np.ndarray) -> None:
        """Saves a small side array with the store (atomically), e.g. the Gram matrix.

        Args:
            name: letters, digits, ``_``, ``-`` and ``.``.
            array: a numeric array; saved with ``np.save``, read back unchanged.
        """
        self._check_writable("write_extra")
        path = self._layout.extra_path(name)
        value = np.asarray(array)
        if value.dtype.kind not in "biufc":
            raise ValueError(f"Argument `array` must be numeric. Received: array={describe(array)}")
        atomic_write(path, lambda handle: np.save(handle, value, allow_pickle=False))
        self._extras[name] = os.path.basename(path)
        self._layout.write_record(self._fingerprints, self._recorded, self._complete, self._extras)

    def read_extra(self, name: str) -> np.ndarray:
        """The side array saved as ``name`` by ``write_extra``.

        Raises:
            ValueError: the store has no extra array of that name.
        """
        path = self._layout.extra_path(name)
        if name not in self._extras:
            raise ValueError(
                f"The gradient store {self.path!r} has no extra array named {name!r}; it has "
                f"{sorted(self._extras)}. Received: name={name!r}. Save it with `write_extra`."
            )
        return np.load(path, allow_pickle=False)

    # -- reading ------------------------------------------------------------------------
    def _check_complete(self) -> None:
        if not self._complete:
            raise ValueError(
                f"The gradient store {self.path!r} is not complete: {self._rows_written} of "
                f"{self.num_rows} rows are written. Finish the build (run it again with the "
                "same arguments to resume, then call `finish`) before reading it."
            )

    def raw_blocks(self, block_rows: int) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
        """``(start, count, block, scales)`` over the rows, read into reused buffers.

        ``block`` is always ``(block_rows, dim)`` in the stored dtype and ``scales``
        ``(block_rows,)`` float32 (ones for float32 stores); only their first
        ``count`` rows are this block's (the rest is left from earlier blocks, and
        finite). Both buffers are overwritten by the next block. Reads go through
        ``os.preadv``, not a memory map, so the process's resident memory does not
        grow with the file.

        Raises:
            ValueError: the store is not complete, or ``block_rows`` is not positive.
        """
        self._check_complete()
        block_rows = check_positive_int("block_rows", block_rows)
        files = self._layout.files()
        yield from blockio.read_blocks(files, self._offsets, self.num_rows, block_rows)

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows)`` pairs over the store: ``rows`` is ``(b, dim)`` float32.

        Each block is a new array (scales applied); RAM holds one block whatever
        ``num_rows`` is.

        Args:
            block_rows: rows per block (the last may be shorter); default: about
                ``blockio.BLOCK_BYTES`` of memory.

        Raises:
            ValueError: the store is not complete, or ``block_rows`` is not positive.
        """
        block_rows = blockio.choose_block_rows(
            block_rows, self.num_rows, self.dim * (self._layout.dtype.itemsize + 4) + 4
        )
        for start, count, block, scales in self.raw_blocks(block_rows):
            values = kernels.rows(kernels.as_tensor(block), kernels.as_tensor(scales))
            yield start, values.numpy()[:count]
