"""Depth scaling (Table 3) at three sizes: ci (tests), cpu (committed results), paper (TPU pods).

  python -m experiments.depth_scaling --config=configs/depth_scaling.py:cpu --workdir=experiments/results/depth_scaling

Expect (cpu): ~15 min on 2 quiet CPU cores; 3 schemes × 8/32/128 sub-layers × 3 LRs at width 64,
table.md of best eval loss per depth and depth_vs_loss.png. At this scale (0.2 M tokens) the
schemes differ by a few hundredths of a nat; the README says which differences exceed seed noise.
ci: ~1 min, 2 schemes × 2/6 sub-layers, only checks that the pipeline runs. paper: the paper's
width-1024 models on C4 (64 → 1024 sub-layers); a correct config for a pod, never run here.
"""

import ml_collections

from experiments import common

SIZES = common.SIZES


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  size = size or "ci"
  c = common.base_fields(size)
  c.num_prompts = 200  # arith data only: validation problems scored by exact match
  c.lrs_per_scheme = ()  # ((scheme, (lr, ...)), ...): replaces c.lrs for that scheme
  c.train.update(eval_every=0, checkpoint_every=0, keep_checkpoints=1, diag_every=0)
  if size == "ci":
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = (1, 3)  # 2 and 6 sub-layers
    c.lrs = (3e-3,)
    c.noise_seeds, c.noise_num_blocks = (1,), 1
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1)
    c.data.seq_len = 32
    c.train.update(num_steps=20, batch_size=8, warmup_steps=4, log_every=5, eval_batches=2)
  elif size == "cpu":
    c.schemes = ("keel", "pre_ln", "post_ln")
    c.num_blocks = (4, 16, 64)  # 8, 32, 128 sub-layers
    c.lrs = (1e-3, 3e-3, 1e-2)
    c.noise_seeds, c.noise_num_blocks = (1, 2), 16
    c.model.update(d_model=64, num_heads=4, num_kv_heads=2)
    c.data.seq_len = 64
    c.train.update(num_steps=200, batch_size=16, warmup_steps=20, log_every=10, eval_batches=8)
  else:  # the paper's Table 3 models: width 1024, GQA 16/8, seq 4096, ~190B tokens
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = (32, 64, 256, 512)  # 64, 128, 512, 1024 sub-layers
    c.lrs = (3e-3,)
    c.lrs_per_scheme = (("keel", (3e-3, 4.5e-3, 6e-3)), ("pre_ln", (2e-3, 3e-3, 4.5e-3)))
    c.noise_seeds, c.noise_num_blocks = (), 32
    c.model.update(
      d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, dtype="bfloat16", remat_policy="full"
    )
    c.data.update(name="c4/en", tokenizer="sentencepiece", seq_len=4096)
    c.train.update(
      num_steps=45_000,  # × 1024 × 4096 tokens ≈ 190B
      batch_size=1024,
      grad_accum_steps=4,
      warmup_steps=2_500,
      min_learning_rate=1e-7,
      log_every=50,
      eval_batches=16,
      checkpoint_every=1_000,
    )
    c.mesh.shape = (1, -1, 1)  # FSDP over the whole slice
  return c
