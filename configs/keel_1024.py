"""The paper's 1000+ layer model: Keel, 1024 sub-layers (512 blocks), width 1024, for TPU pods.

  python -m keel_jax.main --config=configs/keel_1024.py --workdir=$SHARED/keel_1024 --distributed

Expect: ~6.4B parameters; needs a pod slice (checked with
`python -m keel_jax.aot_compile --config=configs/keel_1024.py --topology=v5p:4x4x8`).
Optimizer and schedule as in the paper: AdamW (0.9, 0.95), weight decay 0.01, clip 1.0,
2,500 warm-up steps then cosine to 1e-7, Keel's peak LR 4.5e-3 at 1024 sub-layers.
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config(arg)
  c.model.update(
    d_model=1024,
    num_heads=16,
    num_kv_heads=8,
    d_ff=3072,
    num_blocks=512,
    residual="keel",
    dtype="bfloat16",
    # "branch" skips recomputing each sub-layer's output projection but needs 43.2 GiB/chip on
    # v5p:4x4x8 (fits) and 18.8 GiB on v5e:16x16 (does not): full remat fits both.
    remat_policy="full",
    # Micro-batches cut the saved [L, B, T, D] carries at no extra FLOPs, where √L nested remat
    # recomputes the forward once more: on v5p:4x4x8, 4 micro-batches need 26.7 GiB/chip vs
    # 30.6 GiB with nested_remat=True and none (`python -m keel_jax.aot_compile`, 2026-11-24).
    nested_remat=False,
  )
  c.data.update(name="c4/en", tokenizer="sentencepiece", seq_len=4096)
  c.train.update(
    num_steps=60_000,
    batch_size=1024,
    # 8 micro-batches of one sequence per chip on 128 chips: fits v5e:8x16 (14.1 of 16 GiB,
    # floor 8.8 GiB; with 4 the floor alone is 16.8 GiB). 4 fit v5p:4x4x8 (26.7 of 95 GiB)
    # and v5e:16x16 (13.6 of 16 GiB).
    grad_accum_steps=8,
    learning_rate=4.5e-3,
    warmup_steps=2_500,
    schedule="cosine",
    min_learning_rate=1e-7,
    log_every=50,
    eval_every=2_000,
    eval_batches=16,
    checkpoint_every=1_000,
    diag_every=500,
  )
  c.mesh.shape = (1, -1, 1)  # fully sharded data parallel over the whole slice
  return c
