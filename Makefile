# `make demo` and `make test` share one virtual environment, built from
# requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed
DEMO_DIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m input_pipeline.demo --out $(DEMO_DIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
