"""The documentation site builds in strict mode and documents every public name."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import tf_influence as tfi

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Subpackages whose own ``__all__`` lists public names the API reference must show.
PUBLIC_MODULES = ["callbacks", "config", "distribute", "engine", "evaluation", "solvers"]


def public_names():
    """``tf_influence.X`` for every public class and function, by public import path."""
    names = [f"tf_influence.{name}" for name in tfi.__all__ if name not in PUBLIC_MODULES]
    for module in PUBLIC_MODULES:
        names += [f"tf_influence.{module}.{name}" for name in getattr(tfi, module).__all__]
    return [name for name in names if not name.endswith("__version__")]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built by ``mkdocs build --strict`` into a temporary directory."""
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-5000:]}"
    return out


def test_site_builds_in_strict_mode(site):
    for page in ["index", "quickstart/index", "concepts/index", "extending/index"]:
        assert (site / f"{page}.html").is_file()
    assert (site / "img" / "influence_digits.png").is_file()


def test_api_reference_documents_every_public_name(site):
    anchors = set()
    for page in (site / "api").rglob("index.html"):
        anchors |= set(re.findall(r'id="(tf_influence\.[\w.]+)"', page.read_text()))
    missing = [name for name in public_names() if name not in anchors]
    assert not missing, f"Public names without an API reference entry: {missing}"


def test_readme_is_a_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text
    for link in re.findall(r"\]\(((?:docs/)[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to a missing file: {link}"
