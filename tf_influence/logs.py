"""Explaining requests logged by TF Serving (``PredictionLog`` records in TFRecord files).

TF Serving's request logging writes ``tensorflow.serving.PredictionLog`` protos
(from the ``tensorflow-serving-api`` package) to TFRecord files. Each
``predict_log.request`` holds the inputs of one request, keyed by the names of
the signature's inputs. ``explain_logs`` explains every logged example against
the training data and writes the top-k helpful and harmful training examples
per example to a CSV file. A record that cannot be explained (not a predict
log, another signature, inputs of the wrong names or shapes, an unreadable
proto) is reported with its number and skipped; the rest of the file is still
processed.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TextIO

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from tf_influence.influence_model import InfluenceModel

FIELDS = ["record", "row", "kind", "rank", "train_index", "score"]


def _protos():
    try:
        from tensorflow_serving.apis import prediction_log_pb2
    except ImportError as error:
        raise ImportError(
            "Reading TF Serving request logs needs the `tensorflow-serving-api` package "
            "(PredictionLog protos). Install it with `pip install tf-influence[serving]` or "
            "`pip install tensorflow-serving-api`."
        ) from error
    return prediction_log_pb2


def read_requests(
    path: str | os.PathLike,
    input_names: Sequence[str],
    input_shapes: Sequence[tuple[int | None, ...]],
    signature_name: str = "serving_default",
) -> Iterator[tuple[int, np.ndarray | list[np.ndarray] | None, str]]:
    """Yields ``(record_number, inputs or None, reason)`` for every record of a log file.

    ``inputs`` is one array (single-input models) or a list in ``input_names`` order;
    when a record cannot be used, ``inputs`` is None and ``reason`` says why.
    """
    prediction_log_pb2 = _protos()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"Argument `logs` must be a TFRecord file. Received: {path!r}, which does not exist."
        )
    for number, record in enumerate(tf.data.TFRecordDataset(path).as_numpy_iterator()):
        try:
            log = prediction_log_pb2.PredictionLog.FromString(record)
        except Exception as error:  # noqa: BLE001 - a corrupt or foreign record is skipped
            yield number, None, f"not a PredictionLog proto ({type(error).__name__})"
            continue
        if not log.HasField("predict_log"):
            kind = log.WhichOneof("log_type")
            yield number, None, f"a {kind or 'empty'} record, not a predict_log"
            continue
        request = log.predict_log.request
        signature = request.model_spec.signature_name or "serving_default"
        if signature != signature_name:
            yield number, None, f"signature {signature!r}, expected {signature_name!r}"
            continue
        names = sorted(request.inputs)
        if len(input_names) == 1 and len(names) == 1:
            arrays = [tf.make_ndarray(request.inputs[names[0]])]
        elif names == sorted(input_names):
            arrays = [tf.make_ndarray(request.inputs[name]) for name in input_names]
        else:
            yield number, None, f"inputs {names}, expected {sorted(input_names)}"
            continue
        bad = [
            (name, a.shape)
            for name, a, shape in zip(input_names, arrays, input_shapes, strict=True)
            if a.ndim != len(shape) + 1
            or any(s is not None and s != d for s, d in zip(shape, a.shape[1:], strict=True))
        ]
        if bad:
            name, shape = bad[0]
            expected = tuple(input_shapes[list(input_names).index(name)])
            yield number, None, f"input {name!r} of shape {shape}, expected (batch, *{expected})"
            continue
        yield number, arrays[0] if len(arrays) == 1 else arrays, ""


def explain_logs(
    im: InfluenceModel,
    logs: str | os.PathLike,
    out: str | os.PathLike,
    top_k: int = 10,
    signature_name: str = "serving_default",
    input_names: Sequence[str] | None = None,
    stream: TextIO | None = None,
) -> dict[str, int]:
    """Explains every logged request with ``im`` and writes ``out`` (CSV).

    Args:
        im: a fitted ``InfluenceModel`` of the served model.
        logs: a TFRecord file of ``PredictionLog`` records.
        out: the CSV file to write: columns ``record, row, kind, rank, train_index,
            score`` (``kind`` is ``helpful`` or ``harmful``; ``row`` is the example's
            position in its request).
        top_k: training examples of each kind per example.
        signature_name: the signature whose requests are explained.
        input_names: the signature's input names (needed for several inputs).
        stream: where skipped records are reported (default: standard output).

    Returns:
        ``{"records": ..., "explained": ..., "examples": ..., "skipped": ...}``.
    """
    stream = stream if stream is not None else sys.stdout
    model = im.model
    shapes = [tuple(t.shape[1:]) for t in model.inputs]
    names = list(
        input_names or [getattr(t, "name", f"input_{i}") for i, t in enumerate(model.inputs)]
    )
    summary = {"records": 0, "explained": 0, "examples": 0, "skipped": 0}
    temporary = f"{os.fspath(out)}.partial"
    with open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(FIELDS)
        for number, inputs, reason in read_requests(logs, names, shapes, signature_name):
            summary["records"] += 1
            if inputs is None:
                summary["skipped"] += 1
                print(f"record {number}: skipped, {reason}", file=stream)
                continue
            top = im.top_k(inputs, k=top_k, verbose=0)
            for row in range(top.harmful_indices.shape[0]):
                for kind, indices, scores in (
                    ("helpful", top.helpful_indices, top.helpful_scores),
                    ("harmful", top.harmful_indices, top.harmful_scores),
                ):
                    for rank in range(indices.shape[1]):
                        writer.writerow(
                            [
                                number,
                                row,
                                kind,
                                rank + 1,
                                int(indices[row, rank]),
                                f"{float(scores[row, rank]):.9g}",
                            ]
                        )
            summary["explained"] += 1
            summary["examples"] += int(top.harmful_indices.shape[0])
    os.replace(temporary, out)
    print(
        f"{summary['explained']} of {summary['records']} records explained "
        f"({summary['examples']} examples); {summary['skipped']} skipped.",
        file=stream,
    )
    return summary


def load_training_arrays(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from an ``.npz`` file holding arrays ``x`` and ``y``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(
            f"Argument `--train` must be an .npz file. Received: {path!r}, which does not exist."
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in ("x", "y") if k not in archive.files]
        if missing:
            raise ValueError(
                f"Argument `--train` must be an .npz file with arrays `x` and `y`. Received: "
                f"{path!r} with arrays {archive.files}."
            )
        return archive["x"], archive["y"]
