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

# Nothing in the suite or the demo needs the Hub; offline mode makes an accidental download fail loudly.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

test: install
	$(OFFLINE) $(PY) -m pytest -q tests

demo: install
	$(OFFLINE) $(PY) demo.py

bench: install
	$(PY) benchmarks/bench_sinkhorn.py
	$(PY) benchmarks/bench_linking.py

clean:
	rm -rf $(VENV) outputs data
