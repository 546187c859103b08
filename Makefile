# Two commands on a fresh machine: `make train` (the default job) and `make test` (the suite).
# Each installs what it needs first: a virtualenv in .venv from setup.cfg, and the Debian
# Fashion-MNIST package where apt exists.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
ARGS ?=

.PHONY: setup data train test quick lint bench clean

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

# The developers' inner loop: everything but the subprocess and two-process tests (under a minute).
quick: setup
	$(PY) -m pytest -q tests -m "not slow and not multiprocess" $(ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup data
	$(PY) -m benchmarks.throughput $(ARGS)

clean:
	rm -rf $(VENV) runs *.egg-info
