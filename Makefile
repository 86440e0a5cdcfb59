# The README's two commands: `make train` (install + main job) and `make test` (the suite, as CI runs it).
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/tiny
BIN := $(VENV)/bin

CONFIG ?= experiments/mai1_500b.py
PROMPT ?= def main(

.PHONY: train eval sample plan test test-fast install clean

$(BIN)/mai-jax: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[data]"
	touch $@

install: $(BIN)/mai-jax

# Test-only dependencies. torch is pinned to the CPU wheel (a plain `torch` would pull CUDA
# libraries); it and transformers are the reference for the Hugging Face parity tests.
$(VENV)/.test-deps: $(BIN)/mai-jax
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test,hf,track,curate,ray,chat,lmeval,fp8]"
	touch $@

# Trains experiments/tiny.py on the embedded corpus (the interpreter's standard library) on CPU.
train: install
	$(BIN)/mai-jax train --config experiments/tiny.py --workdir $(WORKDIR)

# The other commands on the same workdir, without activating .venv (`source .venv/bin/activate`
# puts `mai-jax` on PATH instead).
eval: install
	$(BIN)/mai-jax eval --workdir $(WORKDIR)

sample: install
	$(BIN)/mai-jax sample --workdir $(WORKDIR) --prompt "$(PROMPT)"

plan: install
	$(BIN)/mai-jax plan --config $(CONFIG)

# The whole suite: the fast tests, then the slow end-to-end ones. Each runs on TEST_WORKERS
# pytest-xdist processes (one per core of a 2-core CI machine); --dist loadfile keeps each test file
# on one worker, so a module's fixtures are built once. TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: $(VENV)/.test-deps
	$(PYTEST)
	$(PYTEST) -m slow

test-fast: $(VENV)/.test-deps
	$(PYTEST)

clean:
	rm -rf $(VENV) runs
