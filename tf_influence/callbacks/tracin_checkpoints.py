"""``TracInCheckpoints``: records weights and learning rate during ``model.fit`` for TracIn."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from tf_influence.callbacks._checks import check_epochs, check_every_n_epochs


class TracInCheckpoints(keras.callbacks.Callback):
    """Keeps ``(weights, learning_rate)`` at the end of chosen epochs, for ``tfi.TracIn``.

    Epoch-level hooks only. The learning rate is the optimizer's current one
    (learning-rate schedules are evaluated at the step reached).

    Args:
        every_n_epochs: record every N epochs (epochs N, 2N, ...; 1-based, as Keras
            prints them). Ignored when ``epochs`` is given.
        epochs: the 1-based epoch numbers to record, e.g. ``[5, 10, 15]``.
        directory: if given, each checkpoint is written there as
            ``checkpoint_<epoch>.npz`` (no pickle) instead of being kept in memory;
            ``TracInCheckpoints.from_directory`` reads them back.

    Attributes:
        checkpoints: list of ``(weights, learning_rate)``, ``weights`` as
            ``model.get_weights()`` returns them.
        epochs_recorded: the 1-based epochs recorded so far.

    Example:
        >>> ckpts = tfi.callbacks.TracInCheckpoints(every_n_epochs=5)
        >>> model.fit(x, y, epochs=20, callbacks=[ckpts])
        >>> scores = tfi.TracIn(model, ckpts).fit(x, y).explain(x_test, y_test)
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        epochs: Sequence[int] | None = None,
        directory: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.every_n_epochs = check_every_n_epochs(every_n_epochs, allow_none=False)
        self.epochs = check_epochs(epochs)
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise ValueError(
                f"Argument `directory` must be a path or None. Received: directory={directory!r}"
            )
        self.directory = None if directory is None else os.fspath(directory)
        self._in_memory: list = []
        self._files: list[str] = []
        self.epochs_recorded: list[int] = []

    def get_config(self) -> dict[str, Any]:
        """The constructor arguments, as in Keras."""
        return {
            "every_n_epochs": self.every_n_epochs,
            "epochs": self.epochs,
            "directory": self.directory,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TracInCheckpoints:
        """Rebuilds the callback from ``get_config``'s output."""
        return cls(**config)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> TracInCheckpoints:
        """Checkpoints written by a run with ``directory=...``, in epoch order."""
        files = sorted(glob.glob(os.path.join(os.fspath(directory), "checkpoint_*.npz")))
        if not files:
            raise ValueError(
                f"Argument `directory` holds no checkpoint_*.npz file. Received: "
                f"directory={os.fspath(directory)!r}."
            )
        callback = cls(directory=directory)
        callback._files = files
        callback.epochs_recorded = [int(os.path.basename(f)[11:-4]) for f in files]
        return callback

    def _wanted(self, epoch: int) -> bool:
        if self.epochs is not None:
            return epoch in self.epochs
        return epoch % self.every_n_epochs == 0

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        epoch += 1  # 1-based, as Keras prints it
        if not self._wanted(epoch):
            return
        weights = self.model.get_weights()
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if self.directory is None:
            self._in_memory.append((weights, learning_rate))
        else:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f"checkpoint_{epoch:06d}.npz")
            arrays = {f"weight_{i}": w for i, w in enumerate(weights)}
            with open(path + ".partial", "wb") as handle:
                np.savez(handle, learning_rate=np.asarray(learning_rate), **arrays)
            os.replace(path + ".partial", path)
            self._files.append(path)
        self.epochs_recorded.append(epoch)

    @property
    def checkpoints(self) -> list[tuple[list[np.ndarray], float]]:
        """``(weights, learning_rate)`` per recorded epoch (read from disk with ``directory``)."""
        if self.directory is None:
            return list(self._in_memory)
        result = []
        for path in self._files:
            with np.load(path, allow_pickle=False) as archive:
                count = sum(name.startswith("weight_") for name in archive.files)
                weights = [archive[f"weight_{i}"] for i in range(count)]
                result.append((weights, float(archive["learning_rate"])))
        return result
