VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench gpu-bench lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --out results/demo

# one pytest worker per core (pytest-xdist), whole files per worker so module fixtures are built once
test: $(STAMP)
	$(PY) -m pytest -n auto --dist loadfile

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

# the GPU figures (benchmarks/gpu.py): with the machine's own JAX, Flax, Optax, Orbax (and PyTorch, if any);
# no virtual environment, no install
GPU_PY ?= python3
gpu-bench:
	PYTHONPATH=$(CURDIR) $(GPU_PY) benchmarks/gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check mclandscape tests experiments benchmarks

clean:
	rm -rf results .pytest_cache
