# Two commands for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# On machines without an NVIDIA GPU, install the CPU build of torch first; otherwise
# the plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0

.PHONY: demo test test-slow test-slow-ci lint bench install install-dev clean flower-demo

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

# The slow tests CI runs: all but the `long` ones, whose path `make demo` covers. Two workers:
# the Flower deployments mostly wait on processes and heartbeats, and each uses its own ports.
test-slow-ci: $(VENV)/.dev
	$(PY) -m pytest -n 2 --dist worksteal -q -m "slow and not long" --durations=15

# Style and import order (ruff, configured in pyproject.toml).
lint: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.base
	$(PY) benchmarks/aggregation.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build dist src/*.egg-info

# A real Flower deployment on 127.0.0.1 (SuperLink + 3 SuperNodes of three client types,
# builtin:tiny-llama, 2 rounds) into runs/flower-demo; every process is stopped by PID on exit.
flower-demo: $(VENV)/.dev
	rm -rf runs/flower-demo runs/flower-demo.logs
	PY=$(PY) TIMEOUT=280 bash scripts/flower-loopback.sh runs/flower-demo \
	  "partition-id=0 client-type='type1'" "partition-id=1 client-type='type2'" "partition-id=2 client-type='type3'" \
	  -- "set='model=\"builtin:tiny-llama\";rounds=2;num_clients=3;clients_per_round=3;local_steps=4;data_options.max_per_task=8;eval.max_tasks=2;eval.max_examples_per_task=4;eval.max_new_tokens=8'"
	$(PY) scripts/check_run_dir.py runs/flower-demo --rounds 2 --clients 3
