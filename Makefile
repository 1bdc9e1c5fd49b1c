# `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11 with venv; no network but PyPI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test quality demo bench clean

# The pinned requirements, then the project itself (editable, so the otmel-* commands exist in .venv/bin and run this
# checkout). Its dependencies are the same pins (pyproject.toml reads requirements.txt), hence --no-deps; the pinned
# setuptools of requirements-dev.txt builds it, hence --no-build-isolation (no second download).
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Nothing in the suite or the demo needs the Hub; offline mode makes an accidental download fail loudly.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

test: install
	$(OFFLINE) $(PY) -m pytest -q tests

# Lint (pyflakes, pycodestyle, import order) and formatting, configured in pyproject.toml. `ruff format .` fixes the second.
quality: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: install
	$(OFFLINE) $(PY) demo.py

bench: install
	$(PY) benchmarks/bench_sinkhorn.py
	$(PY) benchmarks/bench_linking.py

clean:
	rm -rf $(VENV) outputs data build *.egg-info
