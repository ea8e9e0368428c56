#!/usr/bin/env bash
# Creates the virtualenvs of the external comparison, idempotently (a venv whose
# stamp file exists is left alone; delete the folder to rebuild it).
#
#   bash benchmarks/external/setup_envs.sh [PREFIX]     # default PREFIX=/tmp
#
# PREFIX/bench-influenciae : tensorflow 2.15 (Keras 2) + influenciae 0.3.0
# PREFIX/bench-torch       : torch 2.13.0 (CPU) + pyDVL[influence] 0.10.0
#                            (+ an attempt at torch-influence, logged)
# The tf_influence venv is the project's own (.venv from `make test`, or any venv
# with `pip install -e ".[dev]"`).
set -euo pipefail

PREFIX="${1:-/tmp}"
PYTHON="${PYTHON:-python3}"

make_venv() {
  local dir="$1"
  if [ ! -x "$dir/bin/python" ]; then
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
  fi
}

# -- influenciae ------------------------------------------------------------------
# influenciae 0.3.0 (the latest) declares tensorflow>=2.7,<2.10, for which PyPI has no
# wheels for Python 3.11; `pip install "tensorflow==2.15.*" influenciae` therefore
# resolves to influenciae 0.1.0 (tensorflow>=2.7). We install 0.3.0 with --no-deps on
# top of TF 2.15, whose Keras 2 API it uses; `pip check` then reports the pin, which
# we accept (the benchmark checks its exact scores against ours to 1e-6).
INF="$PREFIX/bench-influenciae"
if [ ! -f "$INF/.bench-ok" ]; then
  make_venv "$INF"
  "$INF/bin/pip" install --quiet "tensorflow==2.15.*" scikit-learn matplotlib
  "$INF/bin/pip" install --quiet --no-deps "influenciae==0.3.0"
  "$INF/bin/pip" check > "$INF/pip-check.log" 2>&1 || true
  "$INF/bin/python" -c "import deel.influenciae, tensorflow as tf; print('influenciae venv:', tf.__version__)"
  touch "$INF/.bench-ok"
fi

# -- torch: pyDVL and torch-influence -------------------------------------------------
# torch 2.13.0 comes from the CPU wheel on this machine's disk (/opt/wheels); other
# versions would pull multi-GB CUDA builds from PyPI.
TORCH="$PREFIX/bench-torch"
if [ ! -f "$TORCH/.bench-ok" ]; then
  make_venv "$TORCH"
  "$TORCH/bin/pip" install --quiet "torch==2.13.0"
  "$TORCH/bin/pip" install --quiet "pydvl[influence]==0.10.0" scikit-learn "torch==2.13.0"
  # torch-influence is not published on PyPI (its README installs from a git clone);
  # keep pip's answer for the report.
  "$TORCH/bin/pip" install "torch-influence" > "$TORCH/torch-influence-pip.log" 2>&1 || true
  "$TORCH/bin/python" -c "import torch, pydvl; print('torch venv:', torch.__version__, pydvl.__version__)"
  touch "$TORCH/.bench-ok"
fi
grep -h "^ERROR" "$TORCH/torch-influence-pip.log" || echo "torch-influence: installed"
