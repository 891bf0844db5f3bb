"""Seconds-long run for tests: tiny Keel model, 12 steps on pycode.

  python -m keel_jax.main --config=configs/smoke.py --workdir=/tmp/keel_smoke

Expect: finishes in ~15 s on 2 CPU cores (mostly compilation); loss falls from ~6.2.
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.model.update(d_model=32, num_heads=2, num_kv_heads=1, num_blocks=2)
  c.data.seq_len = 32
  c.train.update(
    num_steps=12,
    batch_size=8,
    warmup_steps=2,
    learning_rate=3e-3,
    log_every=2,
    eval_every=6,
    eval_batches=2,
    checkpoint_every=4,
    diag_every=4,
  )
  return c
