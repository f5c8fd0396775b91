# `make demo` and `make test` do all the set-up on a fresh machine: a .venv, torch first
# (override TORCH for your CUDA build, e.g. TORCH="torch torchvision --index-url ..."),
# then this package with its dev extras.
PYTHON ?= python3
TORCH ?= torch==2.14.1 torchvision==0.29.1
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test docs clean

$(BIN)/mml: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

setup: $(BIN)/mml

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/mml fit clip-shapes

test: setup
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q $(PYTEST_ARGS)

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) runs site *.egg-info
