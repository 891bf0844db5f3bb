"""What `make demo` runs: a 16-sub-layer Keel model trained on the embedded pycode corpus.

  python -m keel_jax.main --config=configs/demo.py --workdir=workdirs/demo

Expect: a few minutes on 2 CPU cores; progress bar with loss and tokens/s, an eval
(loss, perplexity, bits per byte), workdirs/demo/loss.png, and a sample of generated
Python continuing "def ". Re-running resumes from the last checkpoint (and, once
finished, only re-evaluates and samples).
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.model.update(d_model=128, num_heads=4, num_kv_heads=2, num_blocks=8)
  c.data.seq_len = 128
  c.train.update(
    num_steps=600,
    batch_size=16,
    learning_rate=3e-3,
    warmup_steps=50,
    log_every=20,
    eval_every=200,
    eval_batches=8,
    checkpoint_every=200,
    diag_every=100,
    sample_prompt="def ",
  )
  return c
