# Two commands for a newcomer: `make demo` and `make test`.
# Either one creates (or refreshes) the environment in .venv/ first.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export PREFECT_LOGGING_LEVEL ?= WARNING

.PHONY: demo test lint venv clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# torch first and pinned: the CPU build of 2.13.0, never a CUDA wheel pulled in by a range.
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e '.[test,ray]'
	# img2dataset drags in the `dataclasses` 0.6 backport, which shadows the standard
	# library module and breaks Prefect's server: remove it.
	-$(VENV)/bin/python -m pip uninstall -q -y dataclasses
	$(VENV)/bin/python -c "import dataclasses, sys; assert 'site-packages' not in (dataclasses.__file__ or ''), dataclasses.__file__"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ccrk reproduce --config configs/demo.yaml

# The layering (import-linter contracts in pyproject.toml, ARCHITECTURE.md) and ruff first: seconds, not minutes.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: lint
	$(VENV)/bin/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
