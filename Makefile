# The two commands of the README. Both run scripts/setup.sh first (a no-op once set up).
VENV ?= .venv
PY := $(VENV)/bin/python
# The paper's prompts/evals and hh-rlhf, read in place (never copied into the repository):
# ../shared/data when it sits beside the checkout, else whatever CAI_DATA_DIR says.
ifeq ($(CAI_DATA_DIR),)
ifneq ($(wildcard ../shared/data),)
export CAI_DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: setup run test test-all lint bench

setup:
	@bash scripts/setup.sh

# Main job on the embedded SmolLM2-135M-Instruct. Extra Hydra overrides: make run ARGS="sft.num_revisions=2"
run: setup
	$(PY) src/train.py $(ARGS)

# Fast test suite (under 10 minutes on 2 cores). `make test-all` includes the slow tests.
test: setup
	$(PY) -m pytest -q $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow" $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks && $(VENV)/bin/ruff format --check src tests benchmarks
