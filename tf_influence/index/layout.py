"""The files of a gradient store, how rows are encoded in them, and its record.

For ``path="index.npy"``:

* ``index.npy``: the ``(num_rows, dim)`` rows, a standard ``.npy`` file (float16 or
  float32, C order), created at its full size (sparse) and filled in row order.
* ``index.npy.scales.npy`` (float16 stores only): one float32 scale per row. Row j
  is stored as ``row_j / scale_j`` with ``scale_j = max(abs(row_j))``, so every row
  keeps float16's full relative precision (an error of at most 2**-11 of its
  largest entry) whatever its magnitude: gradients of 1e-7 do not vanish and
  gradients of 1e5 do not overflow.
* ``index.npy.progress.json``: the record. The shape, the dtype, the fingerprints,
  how many rows are written, whether the store is complete, and the extra arrays.
  It stays when the store is complete: ``GradientStore.open`` reads it.
* ``index.npy.extra.<name>.npy``: small side arrays (``write_extra``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import warnings

import numpy as np

from tf_influence._errors import user_stacklevel
from tf_influence._files import read_record, write_record
from tf_influence.index import kernels
from tf_influence.index.blockio import size_text

FORMAT = "tf_influence.gradient_store/1"
DTYPES = ("float16", "float32")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def check_path(path: str | os.PathLike) -> str:
    """``path`` as a str, or a ValueError unless it ends in ``.npy``."""
    path = os.fspath(path)
    if not isinstance(path, str) or not path.endswith(".npy"):
        raise ValueError(f"Argument `path` must be a path ending in .npy. Received: path={path!r}")
    return path


def create_npy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Writes the ``.npy`` header and sets the file to its full (sparse) size."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        handle.truncate(handle.tell() + int(np.prod(shape)) * dtype.itemsize)


def npy_layout(path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, offset of the data)`` of a C-ordered ``.npy`` file."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read = np.lib.format.read_array_header_1_0
        if version != (1, 0):
            read = np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read(handle)
        if fortran_order:
            raise ValueError(f"{path!r} holds a Fortran-ordered array")
        return tuple(shape), dtype, handle.tell()


@dataclasses.dataclass(frozen=True)
class StoreLayout:
    """Where a store of ``(num_rows, dim)`` rows of ``dtype`` keeps what, for ``path``."""

    path: str
    num_rows: int
    dim: int
    dtype: np.dtype

    @property
    def record_path(self) -> str:
        return self.path + ".progress.json"

    @property
    def scaled(self) -> bool:
        """Whether rows are stored with a per-row scale (float16)."""
        return self.dtype == np.float16

    @property
    def row_bytes(self) -> int:
        """Bytes on disk per row (row and scale)."""
        return self.dim * self.dtype.itemsize + (4 if self.scaled else 0)

    @property
    def remedy(self) -> str:
        return (
            f"delete {self.path!r} and the files beside it whose names start with it, "
            "or choose another path"
        )

    def files(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """``(path, shape, dtype)`` of the rows' file and (float16) the scales' file."""
        files = [(self.path, (self.num_rows, self.dim), self.dtype)]
        if self.scaled:
            files.append((self.path + ".scales.npy", (self.num_rows,), np.dtype(np.float32)))
        return files

    def extra_path(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(
                "Argument `name` must be a str of letters, digits, '_', '-' or '.'. "
                f"Received: name={name!r}"
            )
        return f"{self.path}.extra.{name}.npy"

    def warn_if_too_big(self) -> None:
        """Warns if the store will not fit in its disk's free space."""
        needed = self.num_rows * self.row_bytes
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(self.path))).free
        if free < needed:
            warnings.warn(
                f"The gradient store {self.path!r} will need {size_text(needed)} and its disk "
                f"has {size_text(free)} free: the build will stop when the disk is full (and "
                "can be resumed).",
                stacklevel=user_stacklevel(),
            )

    def create(self) -> None:
        for path, shape, dtype in self.files():
            create_npy(path, shape, dtype)

    def offsets(self) -> list[int]:
        """Where each file's data starts, after checking it holds what the layout says."""
        offsets = []
        for path, shape, dtype in self.files():
            try:
                found_shape, found_dtype, offset = npy_layout(path)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"The gradient store's file {path!r} cannot be read ({error}). To start "
                    f"again, {self.remedy}."
                ) from error
            size = offset + int(np.prod(shape)) * dtype.itemsize
            if (found_shape, found_dtype) != (shape, dtype) or os.path.getsize(path) < size:
                raise ValueError(
                    f"The gradient store's file {path!r} does not hold a {dtype.name} array of "
                    f"shape {shape} as its record says (it holds {found_dtype.name} "
                    f"{found_shape}, or is shorter). To start again, {self.remedy}."
                )
            offsets.append(offset)
        return offsets

    def encode(self, values: np.ndarray) -> list[np.ndarray]:
        """The bytes to write for float32 ``(b, dim)`` rows: ``[rows]`` or ``[rows, scales]``."""
        if not self.scaled:
            return [np.ascontiguousarray(values, np.float32)]
        rows, scales = kernels.encode_float16(values)
        return [rows.numpy(), scales.numpy()]

    def differences(self, record: dict) -> list[str]:
        """The layout entries (num_rows, dim, dtype) in which ``record`` differs."""
        mine = {"num_rows": self.num_rows, "dim": self.dim, "dtype": self.dtype.name}
        return [
            f"{name} ({record.get(name)!r} there, {value!r} here)"
            for name, value in mine.items()
            if record.get(name) != value
        ]

    def read_record(self) -> dict:
        return read_record(
            self.record_path, FORMAT, "of a gradient store", f"To start again, {self.remedy}."
        )

    def write_record(
        self, fingerprints: dict, rows: int, complete: bool, extras: dict[str, str]
    ) -> None:
        """Replaces the record atomically."""
        record = {
            "format": FORMAT,
            "num_rows": self.num_rows,
            "dim": self.dim,
            "dtype": self.dtype.name,
            "row_scales": self.scaled,
            "rows_written": rows,
            "complete": complete,
            "fingerprints": fingerprints,
            "extras": extras,
        }
        write_record(self.record_path, record)
