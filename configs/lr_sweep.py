"""Max tolerable LR (Table 1 protocol) at three sizes: ci (tests), cpu (committed), paper (pods).

  python -m experiments.lr_sweep --config=configs/lr_sweep.py:cpu --workdir=experiments/results/lr_sweep

Expect (cpu): ~40 min on 2 quiet CPU cores; 6 schemes × 16/64 sub-layers × 3 seeds at width
64, each a 500-step linear warm-up 0 → 0.1 (resolution 2e-4 per step; at width 64 the paper's
peak 5e-2 mostly ended in plateaus, not divergence); table.md of max LR per scheme and depth
(mean ± std over seeds, why each run stopped), lr_curves.png. ci: ~1 min, 2 schemes × 4
sub-layers, 40 steps: the pipeline only. paper: the paper's setting (width 1024, 0 → 5e-2 over
5,000 steps, 64 and 512 sub-layers); a correct config for a pod, never run here.
"""

import ml_collections

from configs import experiment

SIZES = experiment.SIZES


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  size = size or "ci"
  c = experiment.base_fields(size)
  c.peak_lr = 5e-2  # the paper's warm-up target
  c.seeds = (0,)
  # Divergence detection (see experiments/lr_sweep.py: divergence).
  c.window = 21  # steps in the running median of the per-step train loss (~5% of the run)
  c.check_windows = (9, 21, 41)  # the answer recomputed with these, to show its sensitivity
  c.rise_tol = 0.5  # nats above the best smoothed loss that count as an unrecovered rise
  c.min_delta = 0.02  # nats: smaller improvements do not end a plateau
  c.patience_fraction = 0.15  # plateau: no improvement for this fraction of the run
  # Every step logged (the curve is the measurement); one eval batch at the end (unused).
  c.train.update(
    log_every=1, eval_every=0, eval_batches=1, checkpoint_every=0, keep_checkpoints=1,
    diag_every=0, nonfinite="stop",
  )  # fmt: skip
  if size == "ci":
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = (2,)
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1)
    c.data.seq_len = 32
    c.train.update(num_steps=40, batch_size=8)
    c.window, c.check_windows = 5, (3, 5, 9)
  elif size == "cpu":
    c.schemes = ("keel", "pre_ln", "post_ln", "deepnorm", "hybridnorm", "mix_ln")
    c.num_blocks = (8, 32)  # 16 and 64 sub-layers
    c.seeds = (0, 1, 2)
    c.peak_lr = 0.1  # twice the paper's 5e-2: at width 64 that mostly ended in plateaus
    c.model.update(d_model=64, num_heads=4, num_kv_heads=2)
    c.data.seq_len = 64
    c.train.update(num_steps=500, batch_size=8)
  else:
    c.schemes = ("keel", "pre_ln", "post_ln", "deepnorm", "hybridnorm", "mix_ln")
    c.num_blocks = (32, 256)  # 64 and 512 sub-layers, as in Table 1
    c.window, c.check_windows = 251, (101, 251, 501)
    c.model.update(
      d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, dtype="bfloat16", remat_policy="full"
    )
    c.data.update(name="c4/en", tokenizer="sentencepiece", seq_len=4096)
    c.train.update(num_steps=5_000, batch_size=1024, grad_accum_steps=4, log_every=1)
    c.mesh.shape = (1, -1, 1)
  return c
