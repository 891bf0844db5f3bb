"""Layer redundancy at three sizes: ci (tests), cpu (committed), paper (pods).

  python -m experiments.layer_redundancy --config=configs/layer_redundancy.py:cpu --workdir=experiments/results/layer_redundancy

Expect (cpu): ~4 min on 2 quiet CPU cores when config.source (a depth_scaling workdir) holds its
cells (it reuses each scheme's best-LR 128-sub-layer seed-0 model; without them it first trains
both, ~+4 min): 2 × 128 removals, each scored on 4 validation batches; redundancy.png and table.md.
ci: ~40 s, trains 6-sub-layer Keel and Pre-LN models for 20 steps: the pipeline only.
paper: 512 sub-layers at width 1024 (as the paper's figure); never run here.
Models are trained exactly as configs/depth_scaling.py trains them at the same size.
"""

import ml_collections

from configs import depth_scaling

SIZES = depth_scaling.SIZES


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  size = size or "ci"
  c = depth_scaling.get_config(size)  # same models, data and training (validates size)
  del c.sweep["num_blocks"]  # one depth: config.model.num_blocks
  for name in ("log10_lrs", "log10_lr_step", "max_extend", "lr_follow_depth",
               "seeds", "stop_after_failure", "fail_margin", "cell", "train_missing", "isolate",
               "results_dir", "reuse_stale", "paper_table"):  # fmt: skip
    del c[name]
  c.sweep.residual = ("keel", "pre_ln")
  c.unit = "sublayer"  # sublayer | block: what one removal takes out
  c.threshold = 0.01  # nats: summary counts the units whose removal costs more
  c.eval_batches = c.train.eval_batches
  if size == "ci":
    c.model.num_blocks = 3
    c.data.name = "pycode"  # depth_scaling's ci trains on arith for its exact-match path
    c.source = ""  # no depth_scaling workdir: train here
    c.lrs = (("keel", 3e-3), ("pre_ln", 3e-3))
  elif size == "cpu":
    c.model.num_blocks = 64  # 128 sub-layers
    c.source = "experiments/results/depth_scaling"  # its workdir: best-LR cells reused
    # Used only if the source has no run: each scheme's chosen LR at 128 sub-layers in
    # experiments/results/depth_scaling/table.md (a common 3e-3 under-tunes Pre-LN).
    c.lrs = (("keel", 3.16e-3), ("pre_ln", 3.16e-2))
    c.eval_batches = 4  # removals are paired on the same batches: 4 × 16 × 64 tokens suffice
  else:
    c.model.num_blocks = 256  # 512 sub-layers
    c.source = ""  # or the depth_scaling paper workdir (e.g. gs://<bucket>/depth_scaling)
    c.lrs = (("keel", 4.5e-3), ("pre_ln", 3e-3))
  return c
