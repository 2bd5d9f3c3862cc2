# Two commands on a fresh machine:  `make demo`  and  `make test`.
# A GPU user can pre-install their own torch in $(PY)'s environment: it is kept
# (the venv then sees it through --system-site-packages).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all lint format bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PY) -c "import torch" 2>/dev/null; then \
	    echo "keeping the torch already installed for $(PY)"; $(PY) -m venv --system-site-packages $(VENV); \
	  else $(PY) -m venv $(VENV); fi; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev,workflow]"
	@touch $@

demo: install
	$(BIN)/wsi-mil run --config configs/demo.yaml
	$(BIN)/wsi-mil run --config configs/demo-cached.yaml

test: install
	$(BIN)/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check wsi_mil tests bench
	$(BIN)/ruff format --check wsi_mil tests bench

format: install
	$(BIN)/ruff check --fix wsi_mil tests bench
	$(BIN)/ruff format wsi_mil tests bench

clean:
	rm -rf $(DEMO_DIR) .pytest_cache build *.egg-info
