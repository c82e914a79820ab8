# graphprune: `make demo` and `make test` work on a fresh machine (they create .venv first).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/graphprune demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --durations=10

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
