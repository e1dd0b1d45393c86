# Quick start: `make demo` (the whole 16-cell matrix on generated data, CPU) and `make test`.
# Both install what they need into the active Python first (launcher plugins: extra `cluster`; the docs site: `docs`).
PYTHON ?= python3
# The torch/torchvision pair that imports together on our machines; override for yours.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := .make/installed

.PHONY: install demo test test-fast lint docs

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install $(TORCH) -e ".[dev,cluster,docs]"
	@mkdir -p $(dir $@) && touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m deeplab_dropout.train experiment=demo

lint: $(STAMP)
	$(PYTHON) -m ruff check .

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing page fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict --quiet

# The whole suite (what CI runs): lint, the docs site, every test, in 2 processes (pytest-xdist).
test: lint docs
	$(PYTHON) -m pytest -n 2

# The edit loop: every test not marked slow (under 2 minutes on 2 cores).
test-fast: lint
	$(PYTHON) -m pytest -n 2 -m "not slow"
