"""The analytic memory floor of a train step, to print beside measured peaks.

Floor = params + grads + Adam's two moments (at their configured dtypes), plus the residual
carries the backward must keep for one micro-batch: one [B, T, D] fp32 per block, or, with √L
nested remat, each segment's groups + one group + its plain tail. Activations inside a block,
logits, the runtime and the compiler are above it.
"""

from __future__ import annotations

from keel_jax import model, optimizer


def live_carries(cfg: model.ModelConfig) -> int:
  """Residual carries the backward keeps at once (see the module docstring)."""
  total = 0
  for _, n in cfg.layout():
    groups, size = model.nested_groups(cfg, n)
    total += groups + size + (n - groups * size) if groups else n
  return total


def floor_bytes(config, cfg: model.ModelConfig, params: int, shards: int = 1,
                data_parallel: int = 1) -> int:  # fmt: skip
  """Per device, with the state split over `shards` devices and each micro-batch over
  `data_parallel`."""
  t = config.train
  param_bytes = model.DTYPES[cfg.param_dtype](0).itemsize
  state = params * optimizer.state_bytes_per_param(t, param_bytes) / shards
  rows = t.batch_size // t.grad_accum_steps / data_parallel
  carries = live_carries(cfg) * rows * config.data.seq_len * cfg.d_model * 4
  return int(state + carries)
