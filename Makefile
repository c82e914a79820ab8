# graphprune: `make demo` and `make test` work on a fresh machine (they create .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test test-fast bench bench-test clean

# the product and what its tests need (setup.cfg extra `test`)
$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# what the benchmarks need on top (extra `bench`: Torch-Pruning, for the filter-l1 baseline)
$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/graphprune demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=10

# the suite without the tests marked slow (setup.cfg `markers`); every test module keeps tests here
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) -m "not slow" --durations=10

# the benchmarks' environment; the benchmarks themselves take minutes to hours (README, "Benchmarks")
bench: $(VENV)/.installed-bench
	@echo "benchmarks ready: run them from here with $(PY) -m benchmarks.<script> (README, \"Benchmarks\")"

# the benchmarks' own tests (results-file bookkeeping, report pairing, GPU plans), not part of `make test`
bench-test: $(VENV)/.installed-bench
	$(PY) -m pytest -q benchmarks/tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
