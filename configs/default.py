"""Keel LM, small and CPU-friendly, on the embedded pycode corpus (byte-level).

  python -m keel_jax.main --config=configs/default.py --workdir=/tmp/keel_default

Every other config starts from this one and overrides fields. `config.train` and `config.mesh`
are defined here; `config.model` and `config.data` come from the modules that read them.
"""

import ml_collections

from keel_jax.data.dataset import DEFAULTS
from keel_jax.model import ModelConfig


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()

  # The model's and the data's fields, with their meaning, are defined where they are read:
  # keel_jax/model.py (ModelConfig) and keel_jax/data/dataset.py (DEFAULTS).
  c.model = ml_collections.ConfigDict(ModelConfig.defaults())
  c.data = ml_collections.ConfigDict(DEFAULTS)

  c.train = t = ml_collections.ConfigDict()
  t.seed = 0
  t.num_steps = 300
  t.batch_size = 16  # global, in sequences
  t.grad_accum_steps = 1  # micro-batches per step
  t.learning_rate = 3e-3  # peak
  t.schedule = "cosine"  # cosine | wsd | linear | rsqrt | constant
  t.warmup_steps = 30
  t.min_learning_rate = 1e-7  # floor of the decay
  t.decay_fraction = 0.2  # wsd: fraction of steps spent decaying
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.01  # not applied to norms or biases
  t.grad_clip = 1.0  # global norm; 0 disables
  t.mu_dtype = ""  # Adam's first moment: '' (the params' dtype) | float32 | bfloat16
  t.nu_dtype = ""  # Adam's second moment: '' | float32 | bfloat16
  # remat_policy="auto": the step must fit this many GB (0 → the device's memory: HBM on
  # TPU/GPU, available RAM on CPU).
  t.memory_budget_gb = 0.0
  t.z_loss = 0.0  # coefficient of log(Z)^2
  t.nonfinite = "stop"  # stop | skip: what a NaN/Inf loss or gradient does
  t.log_every = 10
  t.eval_every = 100
  t.eval_batches = 8
  t.diag_every = 100  # per-sub-layer grad/param RMS
  t.checkpoint_every = 100
  t.keep_checkpoints = 3
  t.task_eval_every = 0  # downstream tasks every N steps and at the end (0 = off)
  t.tasks = "arith"  # keel_jax.tasks names, comma-separated, for task_eval_every
  t.task_limit = 200  # examples scored per task (0 = all)
  t.sample_prompt = ""  # if set, print a sample continuing it after training

  c.mesh = ms = ml_collections.ConfigDict()
  ms.shape = (-1, 1, 1)  # -1 → the remaining devices
  ms.axes = ("data", "fsdp", "tensor")
  # Logical axis → mesh axis. The model names axes; only these rules place them.
  ms.rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("embed", "fsdp"),
    ("table_embed", None),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("layer_groups", None),  # the outer scan of nested remat
  )
  return c
