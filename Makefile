# Quick start: `make run` (set up, then train the default model on Fashion-MNIST) and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup run test data bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# torch is an optional test/bench dependency (cross-checks); a CPU build lies on this machine's disk.
	-$(PY) -m pip install -q torch==2.13.0 || echo "torch not installed: PyTorch cross-checks will be skipped"
	@# MPI (data-parallel training on CPUs: mpirun -n N hetnet train): Debian's Open MPI when root with apt, then
	@# mpi4py; without them the MPI tests are skipped.
	@if ! command -v mpirun >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q openmpi-bin libopenmpi-dev || (apt-get update -q && apt-get install -y -q openmpi-bin libopenmpi-dev)) >/dev/null || true; \
	fi
	-@if command -v mpirun >/dev/null; then $(PY) -m pip install -q -e '.[mpi]' || echo "mpi4py not installed: MPI tests will be skipped"; fi
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package; hetnet also downloads it (with checksums) when online.
data:
	@if [ ! -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null || true; \
	fi

run: setup data
	$(VENV)/bin/hetnet train

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/hetnet bench

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
