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

# One pytest process keeps about one core busy (tracing and Python run on one thread),
# so the suite runs in one worker per core, at most 4 (pytest-xdist); the tests of a
# file stay in one worker, which builds that file's fixtures once. TEST_WORKERS=0 runs
# it in this process. The slowest tests are listed at the end.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && echo 4 || echo $$n)

test: $(STAMP)
	$(PY) -m pytest -ra -n $(TEST_WORKERS) --dist loadfile --durations=40

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) -m benchmarks.accuracy
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.recycle
	$(PY) -m benchmarks.distributed
	$(PY) -m benchmarks.trust
	$(PY) -m benchmarks.first_answer

# The whole tree: the package, tests, benchmarks, examples, docs helpers and notebooks.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
