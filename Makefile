# One-command set-up: every target creates .venv and installs what it needs.
# The tpu extra (libtpu, ~700 MB) is installed too: the tests AOT-compile for TPU pods on CPU;
# so is prose (the kjv corpus, 2 MB), so its tests run, and gcs (gcsfs: gs:// paths).
# JAX_PLATFORMS=cpu keeps JAX on the CPU and libtpu quiet when no TPU is attached.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Extra flags for make demo, e.g. DEMO_ARGS=--config.train.num_steps=50
DEMO_ARGS ?=

.PHONY: install test demo lint format clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,notebooks,tpu,prose,gcs]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m keel_jax.main --config=configs/demo.py --workdir=workdirs/demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) workdirs .pytest_cache
