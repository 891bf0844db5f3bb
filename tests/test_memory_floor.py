"""The analytic memory floor: carries per remat layout and state bytes per moment dtype."""

from __future__ import annotations

from configs import default
from keel_jax import memory_floor
from keel_jax.model import ModelConfig


def test_live_carries_per_block_and_nested():
  # Keel lays 9 blocks out as a distinct first block, then 8 identical ones.
  flat = ModelConfig(vocab_size=64, residual="keel", num_blocks=9)
  nested = ModelConfig(vocab_size=64, residual="keel", num_blocks=9, nested_remat=True)
  assert memory_floor.live_carries(flat) == 9
  # The run of 8: 4 groups of 2 (4 carries), one group recomputed (2), no tail.
  assert memory_floor.live_carries(nested) == 1 + 4 + 2
  deep = ModelConfig(vocab_size=64, residual="pre_ln", num_blocks=512, nested_remat=True)
  assert memory_floor.live_carries(deep) == 32 + 16  # 32 groups of 16: ≈ 2√L


def test_floor_arithmetic():
  c = default.get_config()
  c.train.update(batch_size=8, grad_accum_steps=2)
  c.data.seq_len = 16
  cfg = ModelConfig(vocab_size=64, residual="pre_ln", num_blocks=3, d_model=32)
  carries = 3 * (8 // 2) * 16 * 32 * 4
  assert memory_floor.floor_bytes(c, cfg, 1000) == 16 * 1000 + carries
  c.train.update(mu_dtype="bfloat16", nu_dtype="bfloat16")
  assert memory_floor.floor_bytes(c, cfg, 1000) == 12 * 1000 + carries
  # Sharded: the state over 4 chips, each micro-batch over 2.
  assert memory_floor.floor_bytes(c, cfg, 1000, shards=4, data_parallel=2) == 3000 + carries // 2
