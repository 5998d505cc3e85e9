# `make demo` and `make test` share one virtual environment, built from
# requirements.txt when it is missing or older than requirements.txt.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.requirements-installed
DEMO_DIR ?= runs/demo
# Config overrides for both demo steps, e.g. DEMO_FLAGS="--config.total_steps=100".
DEMO_FLAGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

# Synthetic studies -> prepare -> the input pipeline (contact sheet) -> training of the
# CPU recipe with checkpoints and metrics in $(DEMO_DIR). A second run resumes there.
demo: $(STAMP)
	$(VENV)/bin/python -m input_pipeline.contact_sheet --config configs/multitask.py:runlocal \
		--out $(DEMO_DIR)/contact_sheet.png $(DEMO_FLAGS)
	$(VENV)/bin/python launch.py --config configs/multitask.py:runlocal --workdir $(DEMO_DIR) $(DEMO_FLAGS)
	$(VENV)/bin/python -m deepcoro_jax.tools.plot $(DEMO_DIR)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
