# `make demo` and `make test` do all the set-up on a fresh machine (Python 3.11 with venv; no network but PyPI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) demo.py

bench: install
	$(PY) benchmarks/bench_sinkhorn.py
	$(PY) benchmarks/bench_linking.py

clean:
	rm -rf $(VENV) outputs data
