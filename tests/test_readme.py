"""The README's ten-line example runs as written and gives what it promises."""

import pathlib
import re

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    digits = load_digits()
    x = StandardScaler().fit_transform(digits.data).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0
    )
    namespace = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    exec(compile(code, str(README), "exec"), namespace)
    scores, top = namespace["scores"], namespace["top"]
    assert scores.shape == (5, len(x_train)) and np.all(np.isfinite(scores))
    assert top.helpful_indices.shape == (5, 10)
    assert np.all(top.helpful_scores[:, 0] <= 0) and np.all(top.harmful_scores[:, 0] >= 0)
