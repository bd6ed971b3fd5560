# ldm — make help lists the targets. Every target does its own set-up (a .venv made with pip).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The embedded default writes here; override RUN=... to keep several.
RUN ?= outputs/default
# torch/torchvision pinned to releases that pip's local cache holds; any version in pyproject's range works.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help install train train-vae train-ldm experiment test test-slow test-all lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

install: $(STAMP)  ## create .venv with pip and install ldm (editable) with its dev extras; idempotent

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

train: install  ## the embedded default end to end: autoencoder, class-conditional LDM, 10x100 samples + grid
	$(BIN)/ldm-train stage=vae hydra.run.dir=$(RUN)/vae group=default $(ARGS)
	$(BIN)/ldm-train stage=ldm first_stage.path=$(RUN)/vae/export hydra.run.dir=$(RUN)/ldm group=default $(ARGS)

train-vae: install  ## stage 1 only (args: ARGS="model/vae=kl_f8 ...")
	$(BIN)/ldm-train stage=vae $(ARGS)

train-ldm: install  ## stage 2 only (args: ARGS="first_stage.path=<export> cond=text ...")
	$(BIN)/ldm-train stage=ldm $(ARGS)

experiment: install  ## one study of experiments/ and its results table (NAME=guidance; SMOKE=1: a few steps)
	@test -n "$(NAME)" || { echo "usage: make experiment NAME=<$$(ls -d experiments/*/ | xargs -n1 basename | tr '\n' ' ')> [SMOKE=1] [ARGS=...]"; exit 2; }
	$(BIN)/ldm-experiment $(NAME) $(if $(SMOKE),--smoke) $(ARGS)

test: install  ## the test suite without the tests marked slow (multi-process runs, whole studies): what to run after a change
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install  ## only the tests marked slow (real multi-process runs, SIGKILL/requeue, studies); CI runs them after make test
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-all: install  ## the whole suite (make test + make test-slow in one pytest run)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: install  ## ruff
	$(BIN)/ruff check ldm tests benchmarks

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
