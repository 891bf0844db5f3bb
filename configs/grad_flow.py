"""Gradient flow across depth at three sizes: ci (tests), cpu (committed), paper (pods).

  python -m experiments.grad_flow --config=configs/grad_flow.py:cpu --workdir=experiments/results/grad_flow

Expect (cpu): ~3 min on 2 quiet CPU cores for 4 schemes at 64 sub-layers, width 64, profiled
at init and after 100 steps (grad_flow.png, table.md of bottom/top and max/min ratios), then
~1 min per scheme for 7 schemes at the paper's width 1024 (64 sub-layers, ~0.4 B parameters),
init only on 2 sequences (table_wide.md). ci: ~40 s, 2 schemes at 8 sub-layers, 10 steps: the pipeline
only. paper: width 1024 at 1024 sub-layers on C4 (profiles after a short run); never run here.
"""

import ml_collections

from configs import experiment

SIZES = experiment.SIZES


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  size = size or "ci"
  c = experiment.base_fields(size)
  c.profile_batches = 4  # validation batches the profiles are averaged over
  # Init-only profiles at the paper's width (forward/backward of a few sequences, no training).
  c.wide = ml_collections.ConfigDict()
  c.wide.schemes = ("keel", "pre_ln", "post_ln", "deepnorm", "hybridnorm", "mix_ln", "sandwich")
  c.wide.model = dict(d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, num_blocks=32)
  c.wide.batch_size, c.wide.seq_len = 2, 128
  c.train.update(
    learning_rate=1e-3, eval_every=0, eval_batches=2, checkpoint_every=0, keep_checkpoints=1,
    diag_every=0,
  )  # fmt: skip
  if size == "ci":
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = 4
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1)
    c.data.seq_len = 32
    c.train.update(num_steps=10, batch_size=8, warmup_steps=2, log_every=5)
    c.profile_batches = 2
    c.wide.schemes = ("keel", "post_ln")
    c.wide.model = dict(d_model=64, num_heads=4, num_kv_heads=2, d_ff=0, num_blocks=4)
    c.wide.seq_len = 32
  elif size == "cpu":
    c.schemes = ("keel", "pre_ln", "post_ln", "deepnorm")
    c.num_blocks = 32  # 64 sub-layers
    c.model.update(d_model=64, num_heads=4, num_kv_heads=2)
    c.data.seq_len = 64
    c.train.update(num_steps=100, batch_size=8, warmup_steps=10, log_every=10)
  else:
    c.schemes = ("keel", "pre_ln", "post_ln", "deepnorm", "mix_ln", "sandwich")
    c.num_blocks = 512
    c.model.update(
      d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, dtype="bfloat16", remat_policy="full"
    )
    c.data.update(name="c4/en", tokenizer="sentencepiece", seq_len=4096)
    c.train.update(
      num_steps=2_000, batch_size=1024, grad_accum_steps=4, warmup_steps=500, learning_rate=3e-3,
      log_every=50,
    )  # fmt: skip
    c.mesh.shape = (1, -1, 1)
  return c
