"""Depth scaling (Table 3) at three sizes: ci (tests), cpu (committed results), paper (TPU pods).

  python -m experiments.depth_scaling --config=configs/depth_scaling.py:cpu --workdir=workdirs/depth_scaling

trains the missing cells one after another (resumable: finished cells are skipped), then writes
runs.csv, table.md, depth_vs_metric.png and README.md into the workdir; add
--config.train_missing=False to only aggregate what has finished and list what is missing.
One cell is an ordinary training run; `<size>,<scheme>,<sub_layers>,<lr>,<seed>` after the
colon gives its training config, e.g.

  python -m keel_jax.main --config=configs/depth_scaling.py:cpu,keel,128,0.00316,0 --workdir=...

Expect (cpu): width 64, 200 steps × 16 × 64 tokens of pycode per run, 64 → 1024 sub-layers;
~1.3 min per run at 128 sub-layers on 2 quiet cores, linear in depth: hours for the whole sweep.
ci: ~2 min, 2 schemes × 2/6 sub-layers, only checks that the pipeline runs. paper: the paper's
width-1024 models on C4 (64 → 1024 sub-layers); a correct config for a pod, never run here.
"""

import ml_collections

from configs import experiment
from keel_jax import residual

SIZES = experiment.SIZES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  size, *cell = (arg or "ci").split(",")
  c = experiment.base_fields(size)
  c.cell = ""  # '<scheme>,<sub_layers>,<lr>,<seed>': train only that cell (see experiments/cells)
  c.train_missing = size != "paper"  # False: aggregate finished cells and list the missing ones
  c.results_dir = ""  # tables, plot and README go here ('' → the workdir)
  c.isolate = size == "cpu"  # each cell in a fresh process (a long sweep survives a crash)
  c.num_prompts = 200  # arith validation problems scored by exact match
  # LR grid in log10 steps: the first depth starts from log10_lrs; deeper ones from the previous
  # depth's best and its two neighbours; an optimum at an edge adds the next point beyond it
  # (at most max_extend per side) until it is bracketed or the edge diverges.
  c.log10_lr_step = 0.5
  c.max_extend = 3
  c.lr_follow_depth = size != "paper"  # paper: every depth starts from log10_lrs (parallel slices)
  c.reuse_stale = False  # True: reuse runs of different code too (marked `stale` in runs.csv)
  c.seeds = (0, 1, 2)  # the LR is chosen at seeds[0]; the others re-train the chosen LR
  c.stop_after_failure = ("post_ln",)  # not run deeper than the first depth where it fails
  c.fail_margin = 0.05  # fails: every LR non-finite or within this many nats of unigram
  c.paper_table = "3"
  c.train.update(eval_every=0, checkpoint_every=0, keep_checkpoints=1, diag_every=0)
  if size == "ci":
    # arith: exercises the exact-match path (its accuracy is at chance at this size).
    c.data.update(name="arith", arith_steps=1, arith_num_problems=2_000)
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = (1, 3)  # 2 and 6 sub-layers
    c.log10_lrs = (-2.5,)
    c.max_extend = 0
    c.lr_follow_depth = False  # one LR at every depth
    c.seeds = (0, 1)
    c.fail_margin = -100.0  # 20 steps do not beat a unigram model: never count as failed
    c.num_prompts = 20
    c.model.update(d_model=32, num_heads=2, num_kv_heads=1)
    c.data.seq_len = 32
    c.train.update(num_steps=20, batch_size=8, warmup_steps=4, log_every=5, eval_batches=2)
  elif size == "cpu":
    c.schemes = ("keel", "pre_ln", "post_ln")
    c.num_blocks = (32, 64, 128, 256, 512)  # 64, 128, 256, 512, 1024 sub-layers
    c.log10_lrs = (-3.0, -2.5, -2.0)
    c.model.update(d_model=64, num_heads=4, num_kv_heads=2)
    # pycode, not arith: at this budget a width-64 model answers arith at chance (exact match
    # 0.09-0.12 after 200 or 600 steps at 8 sub-layers, arith_steps 1-4), so its accuracy would
    # separate nothing; code's eval loss does. --config.data.name=arith switches (and adds acc).
    c.data.seq_len = 64
    c.train.update(num_steps=200, batch_size=16, warmup_steps=20, log_every=10, eval_batches=8)
  else:  # the paper's Table 3 models: width 1024, GQA 16/8, seq 4096, ~190B tokens
    c.schemes = ("keel", "pre_ln")
    c.num_blocks = (32, 64, 256, 512)  # 64, 128, 512, 1024 sub-layers
    c.log10_lrs = (-2.75, -2.5, -2.25)
    c.log10_lr_step = 0.25
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
      keep_checkpoints=2,
    )
    # The downstream suite at the end of each run: its average is the table's accuracy column.
    c.train.update(task_eval_every=c.train.num_steps, tasks=experiment.PAPER_TASKS, task_limit=0)
    c.mesh.shape = (1, -1, 1)  # FSDP over the whole slice
  if cell:
    return cell_config(c, *cell)
  return c


def cell_config(c, scheme: str, sub_layers: str, lr: str, seed: str) -> ml_collections.ConfigDict:
  """One cell's training config: what keel_jax.main trains."""
  return experiment.run_config(
    c,
    model=dict(residual=scheme, num_blocks=residual.blocks(sub_layers)),
    train=dict(learning_rate=float(lr), seed=int(seed)),
  )
