# Quick start: `make demo` (the whole 16-cell matrix on generated data, CPU) and `make test`.
# Both install what they need into the active Python first (with the launcher plugins, extra `cluster`).
PYTHON ?= python3
# The torch/torchvision pair that imports together on our machines; override for yours.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := .make/installed

.PHONY: install demo test test-all lint

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install $(TORCH) -e ".[dev,cluster]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m deeplab_dropout.train experiment=demo

lint: $(STAMP)
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest

test-all: lint
	$(PYTHON) -m pytest -m ""
