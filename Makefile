# Two commands set up a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and install everything (system data package included).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankslim-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup demo test bench docs clean

setup: $(STAMP) $(FMNIST)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (offline, no downloads at run time).
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

$(STAMP): requirements-dev.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/rankslim compress --out rankslim-out/demo

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -p no:cacheprovider

bench: setup
	$(PY) benchmarks/svd_baseline.py

clean:
	rm -rf $(VENV) rankslim-out
