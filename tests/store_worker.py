"""A process building a ``GradientStore`` that the test kills in the middle of a write.

    python tests/store_worker.py PATH DTYPE KILL_AT_BLOCK

Writes blocks of ``rows`` in order, recording progress after every block; in block
KILL_AT_BLOCK it writes half of the block's bytes, prints "KILL ME" and waits, so
that tests/test_index_store.py kills it with SIGKILL mid-write.
"""

import os
import sys
import time

import numpy as np

NUM_ROWS, DIM, BLOCK = 300, 24, 32
FINGERPRINTS = {"weights": "w0", "data": "d0", "projection": "seed=0"}


def rows(start, stop):
    """Rows ``start:stop`` of the store, the same in every process (large, tiny and zero rows)."""
    out = np.stack([np.random.default_rng(j).standard_normal(DIM) for j in range(start, stop)])
    out *= 10.0 ** (np.arange(start, stop) % 7 - 3)[:, None]
    out[np.arange(start, stop) % 50 == 0] = 0
    return out.astype(np.float32)


def build(store, blocks=None):
    """Writes the missing rows of ``store`` in blocks of BLOCK (``blocks`` of them at most)."""
    for count, start in enumerate(range(store.rows_written, NUM_ROWS, BLOCK)):
        if blocks is not None and count == blocks:
            return store
        store.write(start, rows(start, min(start + BLOCK, NUM_ROWS)))
    store.finish()
    return store


def main(path, dtype, kill_at):
    from tf_influence.index import GradientStore, blockio
    from tf_influence.index import store as store_module

    store_module.CHECKPOINT_SECONDS = 0  # record progress after every block
    pwrite_all, calls = blockio.pwrite_all, []

    def write_half_then_wait(fd, data, offset):
        calls.append(offset)
        if len(calls) == 1 + kill_at * (2 if dtype == "float16" else 1):  # rows, then scales
            pwrite_all(fd, data[: len(data) // 2], offset)
            print("KILL ME", flush=True)
            time.sleep(600)
        pwrite_all(fd, data, offset)

    blockio.pwrite_all = write_half_then_wait
    build(GradientStore(path, FINGERPRINTS, NUM_ROWS, DIM, dtype))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
