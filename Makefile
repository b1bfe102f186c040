# Every target sets itself up: a fresh clone needs only `make quickstart` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export MALLOC_MMAP_MAX_ = 0
export MALLOC_TRIM_THRESHOLD_ = 1099511627776

.PHONY: setup data quickstart smoke test test-slow test-lowest lint bench clean

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c requirements/lock.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST ships offline as a Debian package; install it only where it is missing.
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist

data: $(FMNIST)

quickstart: setup data
	$(VENV)/bin/oqat run configs/quickstart.yaml --out runs/quickstart

smoke: setup
	$(VENV)/bin/oqat smoke --out runs/smoke

# the architecture contract (pyproject.toml [tool.importlinter]) and the linter, then the tests
lint: setup
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check src tests benchmarks

test: lint
	$(PY) -m pytest -q

test-slow: setup data
	$(PY) -m pytest -q -m slow

# the suite on the lowest supported versions (requirements/lowest.txt), in .venv-lowest
test-lowest:
	test -x .venv-lowest/bin/python || $(PYTHON) -m venv .venv-lowest
	.venv-lowest/bin/python -m pip install -q --disable-pip-version-check -r requirements/lowest.txt -e '.[test]'
	.venv-lowest/bin/python -m pytest -q

bench: setup
	$(PY) benchmarks/bench_supernet.py

clean:
	rm -rf runs .pytest_cache
