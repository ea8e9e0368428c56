"""Benchmarks of tf_influence: one module per question, run from the repository root.

    .venv/bin/python -m benchmarks.run          # rows 1-4 side by side in one process
    .venv/bin/python -m benchmarks.products     # row 1: Hessian-vector product vs gradient
    .venv/bin/python -m benchmarks.explain      # row 2: explain vs a straightforward version
    .venv/bin/python -m benchmarks.scoring      # row 3: scoring every training point
    .venv/bin/python -m benchmarks.scaling      # row 4: time and memory vs training-set size
    .venv/bin/python -m benchmarks.accuracy     # scores vs leave-one-out retraining
    .venv/bin/python -m benchmarks.arnoldi      # Arnoldi's agreement with Exact by rank
    .venv/bin/python -m benchmarks.mislabel     # finding flipped labels
    .venv/bin/python -m benchmarks.trust        # loo_check on a convex and a deep model
    .venv/bin/python -m benchmarks.recycle      # recycled CG directions
    .venv/bin/python -m benchmarks.knn          # kNN candidates (FastIF)
    .venv/bin/python -m benchmarks.distributed  # tf.distribute replicas and workers
    .venv/bin/python -m benchmarks.index_store  # the on-disk gradient store, up to 1M rows

Shared fixtures (data, models, timing, the reference implementation, tables and
plots) live in ``benchmarks.common``; the experiments shared with the test suite
live in ``tf_influence.experiments``. Every script takes ``--help``.

Importing the package sets TensorFlow's log level and the Keras backend before
any benchmark imports TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
