"""Resumable ``explain(..., output="scores.npy")``: no finished chunk is computed twice.

Files, next to ``output``:

* ``scores.npy``: the ``(n_test, n_train)`` matrix, a memory-mapped ``.npy`` filled
  block by block in training order;
* ``scores.npy.progress.json``: how many training columns are written, and the
  fingerprints of the run (weights, training data, solver settings, test points,
  options). Replaced atomically (write to a temporary file, ``os.replace``)
  after the matrix is flushed, so it never claims columns that are not on disk;
* ``scores.npy.solutions.npy``: the inverse-HVP vectors of the test points, written
  atomically once solved, so a resumed run does not solve again.

A run that stops (Ctrl-C, a killed process, a crash) leaves these files; calling
``explain`` again with the same ``output`` checks that every fingerprint is equal,
loads the solutions and goes on from the first unwritten column. Any difference
is refused with an error naming it: results of two different runs are never mixed.
When the matrix is complete, the progress and solution files are removed.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import tensorflow as tf

from tf_influence._files import atomic_write, read_record, write_record
from tf_influence._fingerprint import differing

# Write the progress file at most this often (seconds); 0: after every block.
CHECKPOINT_SECONDS = 1.0
_FORMAT = "tf_influence.explain.progress/1"


class ResumableOutput:
    """The files of one resumable ``explain`` run, created or reopened.

    Args:
        path: the ``.npy`` file of the matrix.
        fingerprints: ``name -> digest`` describing everything the scores depend on.
        shape: ``(n_test, n_train)``.
        dtype: numpy dtype of the scores.
    """

    def __init__(self, path, fingerprints: dict[str, str], shape, dtype):
        self.path = os.fspath(path)
        if not self.path.endswith(".npy"):
            raise ValueError(
                f"Argument `output` must be a path ending in .npy. Received: output={self.path!r}"
            )
        self.progress_path = self.path + ".progress.json"
        self.solutions_path = self.path + ".solutions.npy"
        self.fingerprints = dict(fingerprints)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.done = 0
        self.resumed = os.path.exists(self.progress_path)
        if self.resumed:
            self._reopen()
        self._last_checkpoint = 0.0
        self.scores = None

    def _reopen(self) -> None:
        state = read_record(
            self.progress_path,
            _FORMAT,
            "of an interrupted `explain`",
            f"Delete it (and {self.path!r}) to start again, or choose another `output`.",
        )
        differ = differing(state["fingerprints"], self.fingerprints)
        if tuple(state["shape"]) != self.shape or state["dtype"] != self.dtype.str:
            differ.append("shape or dtype")
        if differ:
            raise ValueError(
                f"Argument `output` refers to an interrupted run ({self.path!r}, "
                f"{state['done']} of {state['shape'][1]} training columns written) that differs "
                f"from this call in: {', '.join(differ)}. Mixing them would give a matrix "
                "from two different runs. Call `explain` exactly as before to resume it, or "
                f"delete {self.path!r} and {self.progress_path!r}, or choose another path."
            )
        if not os.path.exists(self.path):
            raise ValueError(
                f"The progress file {self.progress_path!r} exists but the matrix {self.path!r} "
                "does not. Delete the progress file to start again."
            )
        self.done = int(state["done"])

    # -- solutions ----------------------------------------------------------------------
    def load_solutions(self):
        """The solved vectors of the interrupted run, or None."""
        if self.resumed and os.path.exists(self.solutions_path):
            return np.load(self.solutions_path, allow_pickle=False)
        return None

    def save_solutions(self, solutions: np.ndarray) -> None:
        array = np.asarray(solutions)
        atomic_write(self.solutions_path, lambda handle: np.save(handle, array, allow_pickle=False))

    # -- the matrix (the sink interface of outputs.DenseSink) --------------------------
    def open(self) -> ResumableOutput:
        if self.resumed:
            self.scores = np.lib.format.open_memmap(self.path, mode="r+")
        else:
            self.scores = np.lib.format.open_memmap(
                self.path, mode="w+", dtype=self.dtype, shape=self.shape
            )
            self.checkpoint(force=True)
        return self

    def write(self, start: int, block: np.ndarray) -> None:
        stop = start + block.shape[1]
        self.scores[:, start:stop] = block
        if start <= self.done < stop:
            self.done = stop
        self.checkpoint()

    def checkpoint(self, force: bool = False) -> None:
        """Flushes the matrix, then records ``done`` atomically (throttled)."""
        now = time.monotonic()
        if not force and now - self._last_checkpoint < CHECKPOINT_SECONDS:
            return
        self.scores.flush()
        state = {
            "format": _FORMAT,
            "done": self.done,
            "shape": list(self.shape),
            "dtype": self.dtype.str,
            "fingerprints": self.fingerprints,
        }
        write_record(self.progress_path, state)
        self._last_checkpoint = now

    def result(self):
        self.scores.flush()
        self.scores = None
        for leftover in (self.progress_path, self.solutions_path):
            if os.path.exists(leftover):
                os.remove(leftover)
        return np.load(self.path, mmap_mode="r")


def explain_to_file(state, output, x_test, y_test, batch_size, verbose, target, relative, options):
    """``explain(..., output=)``: scores of a ``FittedState`` into a resumable ``.npy``.

    ``options`` are the explain options the file's fingerprint covers (``relative``
    and a description of ``target``).
    """
    tests = state.test_data(x_test, y_test, batch_size)
    files = ResumableOutput(
        output,
        state.fingerprints(tests, options),
        (tests.num_examples, state.num_train),
        state.objective.dtype.as_numpy_dtype,
    )
    saved = files.load_solutions()
    if saved is None:
        solutions = state.test_queries(x_test, y_test, batch_size, verbose, target)
        files.save_solutions(solutions.numpy())
    else:
        solutions = tf.constant(saved)
    divisors = None if relative is None else state.relative_divisors(relative, verbose)
    sink = files.open()
    try:
        return state.score_training(solutions, verbose, sink, divisors, start=files.done)
    except BaseException:  # Ctrl-C, an error: keep what is done for the next call
        if sink.scores is not None:
            sink.checkpoint(force=True)
        raise


def describe_function(fn) -> str | None:
    """A description of a ``target`` function that is the same in another process."""
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    body = "" if code is None else hashlib.sha256(code.co_code + repr(code.co_consts).encode())
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}:" + (
        body.hexdigest() if body else ""
    )
