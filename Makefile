# Two commands on a fresh machine: `make train` (the default job) and `make test` (the suite).
# Each installs what it needs first: a virtualenv in .venv from setup.cfg, and the Debian
# Fashion-MNIST package where apt exists.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
ARGS ?=

# `make test-latest`: a second venv with the newest JAX, jaxlib, Flax, Optax and Orbax on the registry (JAX 0.11+
# needs Python 3.12+: the newest Python 3.12/3.13 found on PATH or under pyenv), then the quick subset.
LATEST_VENV ?= .venv-latest
LATEST_PACKAGES := jax jaxlib flax optax orbax-checkpoint
PYTHON_LATEST ?= $(shell for v in 3.13 3.12; do \
  p=$$(command -v python$$v 2>/dev/null) && $$p -c 'import venv' 2>/dev/null && echo $$p && exit; \
  p=$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$$v*/bin/python$$v 2>/dev/null | tail -n 1); \
  [ -n "$$p" ] && echo $$p && exit; done; echo $(PYTHON))

.PHONY: setup data train test test-latest quick lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '.[test]'
	touch $@

data:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "No apt here: the trainer will use TFDS (add ARGS='--config.download=True' on a machine with internet)."; \
	fi

train: setup data
	$(PY) train.py --config=configs/default.py --workdir=$(WORKDIR) $(ARGS)

test: setup data lint
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(ARGS)

test-latest: data
	$(PYTHON_LATEST) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q '.[test]'
	$(LATEST_VENV)/bin/python -m pip uninstall -q -y dptrain  # Its pins only; the code runs from the checkout.
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade $(LATEST_PACKAGES)
	@$(LATEST_VENV)/bin/python -c "import sys, jax, flax, optax, orbax.checkpoint as o; print('test-latest: Python', \
	  sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -q -W ignore::DeprecationWarning tests -m "not slow and not multiprocess" $(ARGS)

# The developers' inner loop: everything but the subprocess and two-process tests, on 2 workers (~2.5 min on
# 2 cores; ~5 min in one process on a 2-core AMD EPYC).
quick: setup
	$(PY) -m pytest -q -n 2 tests -m "not slow and not multiprocess" $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup data
	$(PY) -m benchmarks.throughput $(ARGS)

clean:
	rm -rf $(VENV) $(LATEST_VENV) runs *.egg-info
