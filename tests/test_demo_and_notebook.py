"""The demo (`python -m tf_influence demo`) and the notebooks, end to end.

The demo and the quickstart notebook train a softmax regression on scikit-learn's
digits, explain test digits and check the influence scores against real
leave-one-out retraining; each other notebook is executed in a fresh kernel and
asserts its own findings.
"""

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tf_influence.__main__ import main

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = NOTEBOOKS / "01_quickstart.ipynb"
MISLABELLED = NOTEBOOKS / "02_mislabelled_data.ipynb"
GROUPS = NOTEBOOKS / "03_groups_and_retraining.ipynb"
SERVING = NOTEBOOKS / "04_serving.ipynb"
TEXT_CLASSIFIER = NOTEBOOKS / "05_text_classifier.ipynb"
EKFAC_CNN = NOTEBOOKS / "06_ekfac_cnn.ipynb"
# Notebook 06's sizes in the test: its stored defaults (a 310k-parameter residual CNN on
# 1,500 images) take minutes; these keep the same code path (every residual block, EK-FAC,
# per-layer scores, self-influence) within a few seconds of work.
EKFAC_CNN_TEST_SIZES = {"NUM_TRAIN": 200, "SIZE": 8, "WIDTHS": (8, 16), "EPOCHS": 20}


def _check_png(path):
    import matplotlib.image

    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600, image.shape
    gray = image[..., :3].mean(axis=-1)
    assert gray.std() > 0.1, "the picture is blank"
    assert (gray < 0.2).mean() > 0.02, "the picture has (almost) no dark digit pixels"


@pytest.fixture(scope="module")
def demo_result(tmp_path_factory):
    from tf_influence.demo import run_demo

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_demo(output_dir=tmp_path_factory.mktemp("demo"), seed=0, verbose=0)
    result["printed"] = printed.getvalue()
    return result


@pytest.mark.slow
def test_run_demo(demo_result):
    result = demo_result
    assert result["printed"] == ""  # verbose=0 prints nothing
    _check_png(result["png"])
    assert result["accuracy"] > 0.9
    assert result["n_train"] == 1347 and result["num_params"] == 650

    top = result["top_k"]
    assert top.helpful_indices.shape == top.harmful_indices.shape == (3, 5)
    assert np.all(top.helpful_scores < 0), "helpful examples must have negative I_up,loss"
    assert np.all(top.harmful_scores > 0), "harmful examples must have positive I_up,loss"
    assert np.all(np.diff(top.helpful_scores, axis=1) >= 0)  # most helpful first
    assert np.all(np.diff(top.harmful_scores, axis=1) <= 0)  # most harmful first

    # Removing a helpful example raises the test loss, removing a harmful one lowers it.
    predicted, actual = result["predicted_change"], result["actual_change"]
    assert np.all(predicted[:5] > 0) and np.all(predicted[5:] < 0)
    assert np.all(np.sign(actual) == np.sign(predicted))
    assert result["pearson"] > 0.95
    assert result["pearson"] == pytest.approx(np.corrcoef(predicted, actual)[0, 1])


@pytest.mark.slow
def test_cli_demo(tmp_path, demo_result):
    out = tmp_path / "pictures"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    completed = subprocess.run(
        [sys.executable, "-m", "tf_influence", "demo", "--output-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    stdout = completed.stdout
    png = out / "influence_digits.png"
    assert str(png.resolve()) in stdout
    _check_png(png)

    helpful = re.findall(r"most helpful: (.*)", stdout)
    harmful = re.findall(r"most harmful: (.*)", stdout)
    assert len(helpful) == len(harmful) == 3
    score = r"\(label \d, ([+-][\d.]+)\)"
    assert all(float(s) < 0 for line in helpful for s in re.findall(score, line))
    assert all(float(s) > 0 for line in harmful for s in re.findall(score, line))
    assert all(len(re.findall(score, line)) == 3 for line in helpful + harmful)

    pearson = float(re.search(r"Pearson correlation, predicted vs actual: ([\d.]+)", stdout)[1])
    assert pearson > 0.95
    # Same seed, another process: the same numbers.
    assert pearson == pytest.approx(demo_result["pearson"], abs=2e-4)


def test_leave_one_out_retraining_reaches_each_optimum_without_a_new_hessian():
    """The demo's refiner polishes a briefly trained model to the optimum, then retrains
    without each of several examples from the inverse Hessian it has (no new one):
    every result has a zero gradient of its own objective, computed by a separate tape."""
    import keras
    import tensorflow as tf

    from tf_influence.demo import NewtonRefiner, build_model, float64, load_data

    data = load_data()
    x, y = data["x_train"], data["y_train"]
    with float64():
        model = build_model(seed=0)
        model.fit(x, y, batch_size=64, epochs=2, verbose=0)
        refiner = NewtonRefiner(model, x, y)
        hessians = []
        compute = refiner._hessian
        refiner._hessian = lambda weights: hessians.append(1) or compute(weights)
        refiner.minimize()
        optimum = refiner.get_weights()

        def gradient_norm(kept):
            with tf.GradientTape() as tape:
                losses = keras.losses.sparse_categorical_crossentropy(
                    y[kept], model(x[kept]), from_logits=True
                )
                objective = tf.reduce_mean(losses) + tf.add_n(model.losses)
            grads = tape.gradient(objective, model.trainable_variables)
            return float(tf.linalg.global_norm(grads))

        everything = np.arange(len(y))
        assert gradient_norm(everything) <= 1e-11
        polished = len(hessians)  # Newton from far: the curvature is refreshed as it goes
        assert polished >= 1
        for j in (0, 17, 123):
            steps = refiner.minimize(removed=[j])
            assert 0 < steps < 50
            assert gradient_norm(everything != j) <= 1e-11  # the optimum without j
            assert gradient_norm(everything) > 1e-6  # which is not the full optimum
            refiner.set_weights(optimum)
        assert len(hessians) == polished, "leave-one-out retraining needed a new Hessian"


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_cli_demo_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--output-dir" in capsys.readouterr().out


@pytest.mark.parametrize(
    "path",
    [NOTEBOOK, MISLABELLED, GROUPS, SERVING, TEXT_CLASSIFIER, EKFAC_CNN],
    ids=["01", "02", "03", "04", "05", "06"],
)
def test_notebook_is_stored_clean(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "strip the outputs"


def with_parameters(notebook, parameters):
    """Inserts a cell assigning ``parameters`` after the cell tagged "parameters".

    Every name must be assigned in that cell, so that a renamed size fails here
    instead of being silently ignored.
    """
    import nbformat

    tagged = [
        index
        for index, cell in enumerate(notebook.cells)
        if "parameters" in cell.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "the notebook needs one cell tagged 'parameters'"
    source = notebook.cells[tagged[0]].source
    for name in parameters:
        assert re.search(rf"^{name} = ", source, re.MULTILINE), f"{name} is not a parameter"
    lines = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    cell = nbformat.v4.new_code_cell(lines, metadata={"tags": ["injected-parameters"]})
    notebook.cells.insert(tagged[0] + 1, cell)


def execute(path, tmp_path, parameters=None):
    """Runs a notebook in a fresh kernel; returns (number of images, printed text).

    ``parameters`` (a dict) overrides the assignments of the cell tagged
    "parameters" (see ``with_parameters``). Raises CellExecutionError if any cell
    (or one of its own asserts) fails.
    """
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(path, as_version=4)
    if parameters:
        with_parameters(notebook, parameters)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=600,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return images, text


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    images, text = execute(NOTEBOOK, tmp_path)
    assert images >= 3, "expected the top-k grid, self-influence and LOO scatter plots"
    match = re.search(r"Pearson correlation \(predicted vs actual\): ([\d.]+)", text)
    assert match, text[-2000:]
    assert float(match[1]) > 0.9
    assert "self-influence" in text


@pytest.mark.slow
def test_mislabelled_data_notebook_runs(tmp_path):
    # The notebook asserts its own findings (flips found, accuracy gain).
    images, text = execute(MISLABELLED, tmp_path)
    assert images >= 2, "expected the suspicious-images grid and the mislabel curves"
    match = re.search(r"noisy labels ([\d.]+) -> fixed ([\d.]+)", text)
    assert match, text[-2000:]
    assert float(match[2]) > float(match[1])
    assert "InfluenceCallback epoch 30" in text


@pytest.mark.slow
def test_groups_and_retraining_notebook_runs(tmp_path):
    # The notebook asserts its own checks against refitting.
    images, text = execute(GROUPS, tmp_path)
    assert images >= 3, "expected the single-point, group and perturbation figures"
    match = re.search(r"single points: Pearson ([\d.]+)", text)
    assert match and float(match[1]) > 0.95, text[-2000:]
    match = re.search(r"order 1 ([\d.]+), order 2 ([\d.]+)", text)
    assert match and float(match[2]) < float(match[1]), text[-2000:]


@pytest.mark.slow
def test_serving_notebook_runs(tmp_path):
    pytest.importorskip("tensorflow_serving")  # the serving extra (TensorFlow >= 2.21)
    # The notebook asserts that the fresh process matches `top_k` and the log summary.
    images, text = execute(SERVING, tmp_path)
    assert "tf_influence imported by the client: False" in text
    assert "3 of 4 records explained (6 examples); 1 skipped." in text
    assert 'SignatureDef key: "explain"' in text


@pytest.mark.slow
def test_text_classifier_notebook_runs(tmp_path):
    # The notebook asserts its own findings (harmful sentences are flipped labels,
    # self-influence finds most flips).
    images, text = execute(TEXT_CLASSIFIER, tmp_path)
    assert "most helpful:" in text and "most harmful:" in text
    match = re.search(r"highest self-influences: (\d+) of (\d+)", text)
    assert match, text[-2000:]
    assert int(match[1]) >= 0.75 * int(match[2])


def test_ekfac_cnn_notebook_has_its_sizes_as_parameters():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(EKFAC_CNN, as_version=4)
    with_parameters(notebook, EKFAC_CNN_TEST_SIZES)
    injected = [c for c in notebook.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "WIDTHS = (8, 16)" in injected[0].source
    with pytest.raises(AssertionError, match="NUM_LAYERS is not a parameter"):
        with_parameters(notebook, {"NUM_LAYERS": 3})


@pytest.mark.slow
def test_ekfac_cnn_notebook_runs(tmp_path):
    # The notebook asserts its own findings (signs of helpful and harmful images,
    # per-layer parts summing to the scores, self-influence ahead of random).
    images, text = execute(EKFAC_CNN, tmp_path, EKFAC_CNN_TEST_SIZES)
    assert images >= 4, "expected the helpful/harmful grid, the layers, the curves, the grid"
    assert "200 training images of 8x8" in text, text[:2000]
    match = re.search(r"([\d,]+) of ([\d,]+) parameters in Kronecker factors", text)
    assert match, text[-2000:]
    assert 0 < int(match[1].replace(",", "")) < int(match[2].replace(",", ""))
    found = dict(re.findall(r"(\S[^:\n]*): ([\d.]+) of the flips found in the top 10%", text))
    assert set(found) == {"self-influence (EK-FAC)", "training loss", "random"}, text[-2000:]
    assert float(found["self-influence (EK-FAC)"]) > float(found["random"])
