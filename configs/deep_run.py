"""1000+ layers at three sizes: ci (tests), cpu (committed), paper (pods).

  python -m experiments.deep_run --config=configs/deep_run.py:cpu --workdir=experiments/results/deep_run

Expect (cpu): ~6 min per scheme on 2 quiet CPU cores; Keel, Pre-LN and Post-LN with 1024
sub-layers (512 blocks) at width 64, 150 steps of 8 × 64 tokens each, same recipe and seed;
loss_curve.png and table.md with eval loss beside a unigram model's, compile time, step time
and peak RSS. ci: ~30 s, 128 sub-layers for 6 steps: the pipeline only.
paper: configs/keel_1024.py's model (width 1024, 1024 sub-layers) on C4; never run here.
"""

import ml_collections

from configs import experiment

SIZES = experiment.SIZES


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  size = size or "ci"
  c = experiment.base_fields(size)
  c.compilation_cache = ""  # compile time is one of the results: always compile for real
  c.schemes = ("keel", "pre_ln", "post_ln")
  c.seeds = (0,)  # every scheme trains with each seed
  c.min_gain = 0.3  # nats below the unigram model's eval loss that count as "trains"
  c.train.update(
    learning_rate=1e-3, eval_every=0, eval_batches=4, checkpoint_every=0, keep_checkpoints=1,
    diag_every=0,
  )  # fmt: skip
  if size == "ci":
    c.num_blocks = 64  # 128 sub-layers
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1)
    c.data.seq_len = 32
    c.train.update(num_steps=6, batch_size=4, warmup_steps=2, log_every=2, eval_batches=1)
    c.schemes = ("keel",)
    c.min_gain = 0.0
  elif size == "cpu":
    c.num_blocks = 512  # 1024 sub-layers
    c.model.update(d_model=64, num_heads=4, num_kv_heads=2)
    c.data.seq_len = 64
    c.train.update(num_steps=150, batch_size=8, warmup_steps=15, log_every=10)
  else:
    c.num_blocks = 512
    c.model.update(
      d_model=1024, num_heads=16, num_kv_heads=8, d_ff=3072, dtype="bfloat16", remat_policy="full"
    )
    c.data.update(name="c4/en", tokenizer="sentencepiece", seq_len=4096)
    c.train.update(
      num_steps=60_000, batch_size=1024, grad_accum_steps=4, learning_rate=4.5e-3,
      warmup_steps=2_500, log_every=50, eval_every=2_000, eval_batches=16, checkpoint_every=1_000,
    )  # fmt: skip
    c.train.update(task_eval_every=c.train.num_steps, tasks=experiment.PAPER_TASKS, task_limit=0)
    c.mesh.shape = (1, -1, 1)
  return c
