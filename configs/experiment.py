"""Fields every experiment config has (configs/<experiment>.py), and the run config built from
an experiment's sections. The experiments (experiments/) import these; configs import nothing
from experiments/.
"""

import ml_collections

from configs import default


def run_config(exp, *, model: dict | None = None, train: dict | None = None):
  """The experiment's model/data/train/mesh sections, then `model`/`train` overrides."""
  c = default.get_config()
  c.model.update(dict(exp.model))
  c.data.update(dict(exp.data))
  c.train.update(dict(exp.train))
  c.mesh.update(dict(exp.mesh))
  c.model.update(model or {})
  c.train.update(train or {})
  return c


# Downstream suite the `paper` sizes score at the end of each run (keel_jax.tasks names). The paper
# averages 14 benchmarks (arXiv 2601.19895, Table 3); these are the multiple-choice ones available
# in TFDS, which score on every host of a pod slice (generative tasks run on one host only).
PAPER_TASKS = "arc_easy,arc_challenge,piqa,hellaswag,winogrande,openbookqa,boolq"

SIZES = ("ci", "cpu", "paper")  # every experiment's sizes: tests, committed results, TPU pods


def base_fields(size: str) -> ml_collections.ConfigDict:
  """Fields every experiment config has: `size` (checked), configs/default.py's sections (each
  run starts from them, so --config.train.x=... works for any field) and the XLA cache."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
  d = default.get_config()
  c = ml_collections.ConfigDict()
  c.size = size
  c.model, c.data, c.train, c.mesh = d.model, d.data, d.train, d.mesh
  # Persistent XLA cache: runs that differ only in what they train reuse init/eval compiles.
  c.compilation_cache = "~/.cache/keel_jax/xla"  # '' disables
  return c
