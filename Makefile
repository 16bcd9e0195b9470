# The two set-up commands: `make demo` (the main job) and `make test`.
# Each creates or reuses .venv, installs the pinned CPU build of torch first (so that pip never pulls a
# CUDA build to satisfy torch>=2.6), then the package with the extras that target needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# PyPI's Linux torch wheels are CUDA builds (gigabytes); PyTorch's CPU index has the CPU build. Where that
# index cannot be reached (an offline mirror that carries the CPU wheel itself), pip's own settings are used.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q $(TORCH_PIN) $$($(PY) -c "import urllib.request as u; \
		u.urlopen('$(TORCH_INDEX)/torch/', timeout=10); print('--index-url $(TORCH_INDEX)')" 2>/dev/null)
	$(PY) -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m resnet demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

bench: $(STAMP)
	for b in benchmarks/*.py; do $(PY) $$b; done

clean-venv:
	rm -rf $(VENV)
