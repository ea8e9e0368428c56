"""K-FAC and EK-FAC on Conv1D, DepthwiseConv2D, EinsumDense and Embedding layers.

For each kind, on a tiny float64 model ``[layer (tanh), Flatten, Dense logits]``:

1. K-FAC (``samples="exact"``) equals its Kronecker definition, built here with numpy:
   ``A = mean_j mean_t a a^T`` over the layer's input factor with a bias column (patches
   by index loops, an EinsumDense's contracted axes, one-hot tokens), ``S = mean_j
   sum_t J_t^T H_L J_t`` with ``J_t`` the Jacobian of the logits at position t of the
   layer's output (a tape over the model's later layers), per input channel for a
   depthwise convolution;
2. EK-FAC's eigenvalues are the dense Gauss-Newton matrix's diagonal in that
   Kronecker eigenbasis (``test_gauss_newton.dense_ggn``), with an L2 regulariser;
3. on one example with one position, where the factorisation is exact, both equal
   the exact Gauss-Newton inverse;
4. a MultiHeadAttention model: its four EinsumDense projections are covered, and
   EK-FAC's eigenvalues are the Gauss-Newton diagonal in the solver's own basis.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_ekfac import DAMPING, LOSS, approximate_inverse, loss_hessians
from test_gauss_newton import dense_ggn

import tf_influence as tfi
from tf_influence.solvers import _kronecker

F64 = "float64"
L2 = 0.02
N, CLASSES = 9, 3


def fitted(model, x, y, solver, loss=LOSS, damping=DAMPING):
    im = tfi.InfluenceModel(model, loss=loss)
    im.compile(solver=solver, damping=damping)
    im.fit(x, y, batch_size=4, verbose=0)
    return im


def classifier(layer, input_shape, input_dtype=F64, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input(input_shape, dtype=input_dtype),
            layer,
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(CLASSES, dtype=F64, name="logits"),
        ]
    )


def with_bias(rows):
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


# -- each kind: the model, its inputs, and its factors by hand ---------------------------
def conv1d(padding="causal", dilation=2, length=7, seed=0):
    layer = keras.layers.Conv1D(
        3, 3, padding=padding, dilation_rate=dilation, activation="tanh", dtype=F64,
        kernel_regularizer=keras.regularizers.L2(L2), name="layer",
    )  # fmt: skip
    return classifier(layer, (length, 2), seed=seed), "float", (length, 2)


def conv1d_rows(layer, x):
    """``(n, t, k * channels + 1)`` patches by index loops (causal: zeros on the left)."""
    k, d = layer.kernel_size[0], layer.dilation_rate[0]
    pad = d * (k - 1) if layer.padding == "causal" else 0
    padded = np.pad(x, [(0, 0), (pad, 0), (0, 0)])
    steps = padded.shape[1] - d * (k - 1)
    patches = np.stack(
        [np.stack([padded[:, t + i * d] for i in range(k)], axis=1) for t in range(steps)], axis=1
    )  # (n, t, k, channels)
    rows = patches.reshape(len(x), steps, -1)
    kernel = layer.kernel.numpy().reshape(rows.shape[-1], -1)
    return with_bias(rows), rows @ kernel + layer.bias.numpy()


def depthwise(size=4, channels=2, multiplier=2, seed=0):
    layer = keras.layers.DepthwiseConv2D(
        3, depth_multiplier=multiplier, activation="tanh", dtype=F64,
        depthwise_regularizer=keras.regularizers.L2(L2), name="layer",
    )  # fmt: skip
    shape = (size, size, channels)
    return classifier(layer, shape, seed=seed), "float", shape


def depthwise_rows(layer, x):
    """``(n, t, C, kh * kw + 1)`` per-channel patches, and ``z`` as the layer returns it."""
    kh, kw, channels, multiplier = layer.kernel.shape
    n, height, width, _ = x.shape
    out_h, out_w = height - kh + 1, width - kw + 1
    patches = np.stack(
        [
            x[:, r : r + kh, s : s + kw, :].reshape(n, kh * kw, channels)
            for r in range(out_h)
            for s in range(out_w)
        ],
        axis=1,
    )  # (n, t, kh * kw, C)
    kernel = layer.kernel.numpy().reshape(kh * kw, channels, multiplier)
    z = np.einsum("ntpc,pcm->ntcm", patches, kernel).reshape(n, out_h, out_w, -1)
    rows = with_bias(np.transpose(patches, [0, 1, 3, 2]))
    return rows, z + layer.bias.numpy()


def einsum(equation="abc,cde->abde", seed=0):
    shapes = {
        "abc,cde->abde": ((3, 4), (3, 2, 2), "de"),  # query / key / value projections
        "abcd,cde->abe": ((3, 2, 2), (3, 3), "e"),  # the attention output projection
        "abc,cd->adb": ((3, 4), (2, 3), None),  # output axes before the positions
    }
    input_shape, output_shape, bias_axes = shapes[equation]
    layer = keras.layers.EinsumDense(
        equation, output_shape, bias_axes=bias_axes, activation="tanh", dtype=F64,
        kernel_regularizer=keras.regularizers.L2(L2), name="layer",
    )  # fmt: skip
    return classifier(layer, input_shape, seed=seed), "float", input_shape


def einsum_rows(layer, x):
    """Rows ``(n, positions, contracted)`` and ``z`` as the layer returns it."""
    n, kernel = len(x), layer.kernel.numpy()
    if layer.equation == "abc,cde->abde":
        z = np.einsum("nti,ide->ntde", x, kernel) + layer.bias.numpy()
        return with_bias(x), z
    if layer.equation == "abcd,cde->abe":
        rows = x.reshape(n, x.shape[1], -1)
        return with_bias(rows), rows @ kernel.reshape(rows.shape[-1], -1) + layer.bias.numpy()
    return x, np.transpose(x @ kernel, [0, 2, 1])  # abc,cd->adb: z is (n, d, positions)


def embedding(vocabulary=7, dim=3, length=4, seed=0):
    layer = keras.layers.Embedding(
        vocabulary, dim, dtype=F64, name="layer",
        embeddings_regularizer=keras.regularizers.L2(L2),
    )  # fmt: skip
    return classifier(layer, (length,), input_dtype="int32", seed=seed), "tokens", (length,)


KINDS = {
    "conv1d_causal_dilated": (conv1d, {}),
    "conv1d_valid": (conv1d, {"padding": "valid", "dilation": 1}),
    "depthwise": (depthwise, {}),
    "einsum_projection": (einsum, {}),
    "einsum_output_projection": (einsum, {"equation": "abcd,cde->abe"}),
    "einsum_transposed": (einsum, {"equation": "abc,cd->adb"}),
    "embedding": (embedding, {}),
}


def data(kind, shape, n=N, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    if kind == "tokens":
        # Token 6 never occurs: its rows have zero curvature (damping alone).
        return rng.integers(0, 6, size=(n, *shape)).astype("int32"), y
    return rng.normal(size=(n, *shape)), y


def output_jacobians(model, x, y, z):
    """``J = d logits / d z`` per example, ``(n, classes, *z.shape[1:])``, and ``H_L``."""
    layer, *rest = model.layers
    z = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z)
        out = z if isinstance(layer, keras.layers.Embedding) else tf.tanh(z)
        hidden = out
        for later in rest:
            out = later(out)
    return tape.batch_jacobian(out, z).numpy(), loss_hessians(model, out.numpy(), y), hidden


def reference_blocks(model, x, y):
    """``[(A, S, flat indices, diagonal A)]`` per Kronecker product, by hand."""
    layer = model.layers[0]
    n = len(x)
    sizes = [int(np.prod(v.shape)) for v in model.trainable_variables]
    blocks = []
    if isinstance(layer, keras.layers.Embedding):
        z = layer.embeddings.numpy()[x]  # (n, t, dim)
        jac, hess, hidden = output_jacobians(model, x, y, z)
        counts = np.bincount(x.ravel(), minlength=layer.input_dim) / x.size
        s = np.einsum("notd,nop,npte->de", jac, hess, jac) / n
        blocks.append((np.diag(counts), s, np.arange(sizes[0]), True))
        offset = sizes[0]
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        rows, z = depthwise_rows(layer, x)
        jac, hess, hidden = output_jacobians(model, x, y, z)
        kh, kw, channels, multiplier = layer.kernel.shape
        jac = jac.reshape(n, CLASSES, -1, channels, multiplier)
        t = rows.shape[1]
        patch = kh * kw
        for c in range(channels):
            a = np.einsum("nti,ntj->ij", rows[:, :, c], rows[:, :, c]) / (n * t)
            s = np.einsum("notm,nop,nptk->mk", jac[..., c, :], hess, jac[..., c, :]) / n
            # Row i < kh * kw of channel c's matrix is kernel[i, c, :], the last its bias.
            starts = [(i * channels + c) * multiplier for i in range(patch)]
            starts.append(sizes[0] + c * multiplier)
            index = np.concatenate([np.arange(k, k + multiplier) for k in starts])
            blocks.append((a, s, index, False))
        offset = sizes[0] + sizes[1]
    else:
        rows, z = conv1d_rows(layer, x) if isinstance(layer, keras.layers.Conv1D) else (
            einsum_rows(layer, x)
        )  # fmt: skip
        jac, hess, hidden = output_jacobians(model, x, y, z)
        if isinstance(layer, keras.layers.EinsumDense) and layer.equation == "abc,cd->adb":
            jac = np.transpose(jac, [0, 1, 3, 2])  # (n, o, positions, d)
        jac = jac.reshape(n, CLASSES, rows.shape[1], -1)
        a = np.einsum("nti,ntj->ij", rows, rows) / (n * rows.shape[1])
        s = np.einsum("notc,nop,nptd->cd", jac, hess, jac) / n
        offset = sum(sizes[: len(layer.trainable_variables)])
        blocks.append((a, s, np.arange(offset), False))
    h = with_bias(hidden.numpy().reshape(n, -1))
    logits = np.arange(offset, offset + sizes[-2] + sizes[-1])
    blocks.append((h.T @ h / n, hess.mean(axis=0), logits, False))
    return blocks


def reference_inverse(blocks, regular, ggn=None, damping=DAMPING):
    """The block-diagonal ``inv(G_approx + damping*I)`` from reference factors.

    ``ggn``: EK-FAC, whose eigenvalues are the diagonal of ``Q^T G Q`` per block; else
    ``l_A l_S^T`` plus the regulariser's diagonal ``regular`` in that basis.
    """
    p = len(regular)
    out = np.zeros((p, p))
    for a, s, index, diagonal in blocks:
        la, qa = (np.diag(a), np.eye(len(a))) if diagonal else np.linalg.eigh(a)
        ls, qs = np.linalg.eigh(s)
        q = np.kron(qa, qs)
        if ggn is not None:
            values = np.einsum("ij,ik,kj->j", q, ggn[np.ix_(index, index)], q)
        else:
            values = np.kron(np.maximum(la, 0), np.maximum(ls, 0))
            values += np.einsum("ij,i,ij->j", q, regular[index], q)
        out[np.ix_(index, index)] = q @ np.diag(1.0 / (values + damping)) @ q.T
    return out


def regulariser_diagonal(model):
    return np.concatenate(
        [
            np.full(int(np.prod(v.shape)), 0.0 if v.regularizer is None else 2 * L2)
            for v in model.trainable_variables
        ]
    )


@pytest.mark.parametrize("name", list(KINDS))
def test_kfac_equals_its_kronecker_definition_and_ekfac_the_gauss_newton_diagonal(name):
    build, args = KINDS[name]
    model, kind, shape = build(**args)
    x, y = data(kind, shape)
    im = fitted(model, x, y, tfi.solvers.KFAC(samples="exact"))
    coverage = tfi.solvers.ekfac.coverage(im)
    assert set(coverage.values()) == {"kronecker (layer)", "kronecker (logits)"}
    blocks = reference_blocks(model, x, y)
    regular = regulariser_diagonal(model)
    np.testing.assert_allclose(
        approximate_inverse(im), reference_inverse(blocks, regular), rtol=1e-6, atol=1e-9
    )
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    ggn = dense_ggn(im.operator.objective, x, y)
    np.testing.assert_allclose(
        approximate_inverse(im), reference_inverse(blocks, regular, ggn), rtol=1e-6, atol=1e-9
    )


def single_layer(layer, input_shape, input_dtype=F64):
    """The layer alone (its output flattened is the model's output)."""
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input(input_shape, dtype=input_dtype), layer, keras.layers.Flatten(dtype=F64)]
    )


EXACT = {
    # One example, one position: G = (a a^T) (x) J^T H_L J exactly.
    "conv1d": (lambda: single_layer(keras.layers.Conv1D(3, 3, dtype=F64), (3, 2)), LOSS),
    "einsum": (
        lambda: single_layer(
            keras.layers.EinsumDense("abc,cde->abde", (1, 1, 3), bias_axes="de", dtype=F64),
            (1, 4),
        ),
        LOSS,
    ),
    "embedding": (
        lambda: single_layer(keras.layers.Embedding(5, 3, dtype=F64), (1,), "int32"),
        LOSS,
    ),
    # Two channels whose outputs the squared error keeps apart (H_L is diagonal), so
    # the Gauss-Newton matrix is block-diagonal over channels, each block a product.
    "depthwise": (
        lambda: single_layer(
            keras.layers.DepthwiseConv2D(2, depth_multiplier=2, dtype=F64), (2, 2, 2)
        ),
        keras.losses.MeanSquaredError(),
    ),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_one_example_at_one_position_gives_the_exact_gauss_newton_inverse(name):
    build, loss = EXACT[name]
    model = build()
    rng = np.random.default_rng(3)
    shape = model.inputs[0].shape[1:]
    if name == "embedding":
        x = np.array([[2]], dtype="int32")
    else:
        x = rng.normal(size=(1, *shape))
    outputs = model.outputs[0].shape[-1]
    y = rng.normal(size=(1, outputs)) if name == "depthwise" else np.array([1])
    ggn = dense_ggn(tfi.engine.Objective(model, loss=loss), x, y)
    expected = np.linalg.inv(ggn + DAMPING * np.eye(len(ggn)))
    for solver in (tfi.solvers.KFAC(samples="exact"), tfi.solvers.EKFAC(samples="exact")):
        im = fitted(model, x, y, solver, loss=loss)
        np.testing.assert_allclose(approximate_inverse(im), expected, rtol=1e-8, atol=1e-8)


def attention_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3), dtype=F64)
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=F64, name="attention")(
        inputs, inputs
    )
    h = keras.layers.LayerNormalization(dtype=F64, name="norm")(h)
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, dtype=F64, name="logits")(h))


def test_multi_head_attention_projections_are_kronecker_factored():
    model = attention_model()
    x, y = data("float", (4, 3), n=12)
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    coverage = tfi.solvers.ekfac.coverage(im)
    for projection in ("query", "key", "value", "attention_output"):
        for weight in ("kernel", "bias"):
            assert coverage[f"attention/{projection}/{weight}"] == f"kronecker ({projection})"
    assert coverage["norm/gamma"] == coverage["norm/beta"] == "diagonal"
    # The corrected eigenvalues are the Gauss-Newton diagonal in the solver's own basis.
    state = im.settings.solver.state(im.operator)
    ggn = dense_ggn(im.operator.objective, x, y)
    offsets = np.cumsum([0, *im.operator.objective.layout.sizes])
    for block, qa, qs, values in zip(state.blocks, state.qa, state.qs, state.values, strict=True):
        index = np.concatenate(
            [np.arange(offsets[i], offsets[i + 1]) for i in (block.entry.kernel, block.entry.bias)]
        )
        q = np.kron(qa.numpy(), qs.numpy())
        expected = np.einsum("ij,ik,kj->j", q, ggn[np.ix_(index, index)], q)
        np.testing.assert_allclose(values.numpy().ravel(), expected, rtol=1e-8, atol=1e-12)
    # The query's input factor is the inputs' second moment over positions (self-attention).
    rows = with_bias(x).reshape(-1, 4)
    names = [b.entry.layer.name for b in state.blocks]
    qa = state.qa[names.index("query")].numpy()
    rotated = qa.T @ (rows.T @ rows / len(rows)) @ qa
    np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-10)
    # Scores: per layer, summing to the total.
    total = im.explain(x[:3], y[:3], verbose=0)
    parts = im.explain(x[:3], y[:3], verbose=0, per_layer=True)
    assert {"query", "key", "value", "attention_output", "logits"} <= set(parts)
    np.testing.assert_allclose(sum(parts.values()), total, rtol=1e-9, atol=1e-12)
    assert np.isfinite(total).all() and total.shape == (3, 12)


@pytest.mark.parametrize("name", ["depthwise", "embedding"])
def test_saved_factors_round_trip(name, tmp_path):
    """A depthwise block (one product per channel) and an Embedding (no ``Q_A``)."""
    build, args = KINDS[name]
    model, kind, shape = build(**args)
    x, y = data(kind, shape)
    im = fitted(model, x, y, tfi.solvers.EKFAC(samples="exact"))
    expected = im.explain(x[:3], y[:3], verbose=0)
    path = tmp_path / "state.npz"
    im.save(path, include_data=True)
    loaded = tfi.InfluenceModel.load(path, model, loss=LOSS, verbose=0)
    np.testing.assert_allclose(loaded.explain(x[:3], y[:3], verbose=0), expected, rtol=1e-10)
    arrays = im.settings.solver.get_state(im.operator)
    assert ("block0_qa" in arrays) is (name != "embedding")
    arrays["block0_qs"] = arrays["block0_qs"][..., :1, :1]
    with pytest.raises(ValueError, match=r"do not belong to this model.*'layer' has other shapes"):
        _kronecker.from_arrays(im.operator, arrays)
