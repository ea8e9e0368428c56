"""A training-data index on disk: projected training gradients, and queries that stream over them.

    from tf_influence.index import GradientStore, stream_top_k

    store = GradientStore("index.npy", fingerprints, num_rows=n, dim=1024)
    for start in range(store.rows_written, n, 4096):      # resumes where it stopped
        store.write(start, projected_gradients(start, min(start + 4096, n)))
    store.finish()

    top = stream_top_k(GradientStore.open("index.npy"), solved_queries, k=10)
    # top["top_harmful_indices"]: (m, 10), scores[i, j] = -solved_queries[i] @ rows[j]

``GradientStore`` (``store.py``) is the file: written block by block, resumable,
fingerprinted, safe on a full disk, float16 rows with per-row scales by default.
The stream functions (``stream.py``) read it block by block into one reused
buffer (RAM bounded by a block, whatever n is) and do one product per block in a
compiled kernel (``kernels.py``). ``docs/index_store.md`` has the layout and the
measured numbers.
"""

from tf_influence.index.store import GradientStore
from tf_influence.index.stream import stream_gram, stream_quadratic, stream_scores, stream_top_k

__all__ = ["GradientStore", "stream_gram", "stream_quadratic", "stream_scores", "stream_top_k"]
