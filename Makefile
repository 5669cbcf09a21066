# The two commands of the README: `make demo` and `make test`. Each sets itself up on a fresh
# machine: a virtualenv in .venv, torch first (the CPU wheel where there is no NVIDIA GPU), then
# this package with its local-backend and test extras, at the versions in constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU_VERSION ?= 2.13.0
SGLANG_VERSION ?= 0.5.23
STAMP := $(VENV)/.installed
SGLANG_STAMP := $(VENV)/.installed-sglang
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo clean-cache test-slime-env

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet torch; \
	else \
		$(BIN)/python -m pip install --quiet torch==$(TORCH_CPU_VERSION); \
	fi
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[local,test]'
	touch $(STAMP)

# SGLang's own request and processor code, for tests/sglang_contract (the tests only, not the demo):
# its requirements name CUDA builds (torch, flashinfer), so it goes in alone, and the sglang-check
# extra holds what it imports.
$(SGLANG_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[local,test,sglang-check]'
	$(BIN)/python -m pip install --quiet --no-deps sglang==$(SGLANG_VERSION)
	touch $(SGLANG_STAMP)

# Everything CI runs: lint, the suite (SGLang's contract tests must run, not skip), then the plugin
# installed into slime's pinned environment.
test: $(SGLANG_STAMP)
	$(BIN)/ruff check .
	VLM_MULTITURN_REQUIRE_SGLANG=1 $(BIN)/python -m pytest -q -ra
	$(MAKE) test-slime-env

lint: $(STAMP)
	$(BIN)/ruff check .

# The plugin installed into an environment pinned like slime's image (see scripts/check_slime_env.sh).
test-slime-env:
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_CPU_VERSION) scripts/check_slime_env.sh

demo: $(STAMP)
	$(BIN)/python examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend local --demo

clean-cache:
	rm -rf .cache
