# Two commands for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On machines without an NVIDIA GPU, install the CPU build of torch first; otherwise
# the plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-slow bench install install-dev clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then echo "GPU found: installing torch from the index"; \
	 else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q -e ".[dev,flower]"
	touch $@

install: $(VENV)/.base
install-dev: $(VENV)/.dev

demo: $(VENV)/.base
	rm -rf runs/demo
	$(VENV)/bin/flexlora run --output runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -n 2 -q

test-slow: $(VENV)/.dev
	$(PY) -m pytest -q -m slow

bench: $(VENV)/.base
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info
