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

.PHONY: install test test-latest demo lint format clean

# test-latest: a second venv with Python 3.12 and the newest releases (no constraints file), running a
# fast subset: model, optimizer, data, train smoke/resume/SIGTERM, checkpoint, sampling, TPU AOT compile.
PYTHON_LATEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV_LATEST := .venv-latest
PY_LATEST := $(VENV_LATEST)/bin/python
STAMP_LATEST := $(VENV_LATEST)/.installed
LATEST_K := platforms or optimizer or causality_through or jit_equals_no_jit or forward_matches_reference \
  or learns_and_writes or resume_is_bitwise or sigterm_saves or round_trip_is_bitwise or damaged_newest \
  or restore_onto_other_meshes or prefill_then_decode or greedy_is_deterministic or sample_cli \
  or batch_layout or resume_reproduces or tfds_dataset_through or compiles_smoke_for_v5e
LATEST_FILES := tests/test_platforms.py tests/test_optimizer.py tests/test_model.py tests/test_data.py \
  tests/test_train.py tests/test_checkpoint.py tests/test_sample.py tests/test_aot.py

$(STAMP): setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test,notebooks,tpu,prose,gcs]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# PIP_CONSTRAINT= : no constraints file from the environment either; pip takes the newest releases.
$(STAMP_LATEST): setup.cfg pyproject.toml
	$(PYTHON_LATEST) -m venv $(VENV_LATEST)
	PIP_CONSTRAINT= $(PY_LATEST) -m pip install -q --upgrade pip
	PIP_CONSTRAINT= $(PY_LATEST) -m pip install -q --upgrade -e ".[test,tpu,prose,gcs]"
	touch $(STAMP_LATEST)

test-latest: $(STAMP_LATEST)
	$(PY_LATEST) -c "import sys, jax, flax, orbax.checkpoint as o; print('test-latest: Python', \
	  sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'orbax', o.__version__)"
	JAX_PLATFORMS=cpu $(PY_LATEST) -m pytest -q -n 2 --dist loadfile $(LATEST_FILES) -k "$(LATEST_K)" \
	  $(PYTEST_ARGS)

demo: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m keel_jax.main --config=configs/demo.py --workdir=workdirs/demo $(DEMO_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) $(VENV_LATEST) workdirs .pytest_cache
