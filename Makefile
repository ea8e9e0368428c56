# Two commands do all the set-up: `make demo` and `make test`.
# Each creates and fills .venv by itself when it is missing or out of date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test docs bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tf_influence demo

test: $(STAMP)
	$(PY) -m pytest -ra

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/accuracy.py
	$(PY) benchmarks/run.py
	$(PY) benchmarks/recycle.py
	$(PY) benchmarks/first_call.py
	$(PY) benchmarks/distributed.py
	$(PY) benchmarks/trust.py

# The whole tree: the package, tests, benchmarks, examples, docs helpers and notebooks.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
