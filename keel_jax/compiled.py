"""The sharded train step compiled ahead of time, and the memory its executable needs.

`compile_train_step` lowers the real step for a mesh of real devices or of a TPU topology's
(keel_jax.aot_compile); `memory_report` reads `compiled.memory_analysis()`, which does not
report capacity, so chips' HBM comes from a vendor table.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from keel_jax import attention, builders, sharding, steps

GiB = 1024**3
# HBM per chip (vendor figures); memory_analysis() does not report capacity.
HBM_BYTES = {
  "TPU v4": 32 * GiB,
  "TPU v5 lite": 16 * GiB,  # v5e
  "TPU v5": 95 * GiB,  # v5p
  "TPU v6 lite": 32 * GiB,  # v6e
}


def hbm_bytes(device_kind: str) -> int | None:
  for name, size in sorted(HBM_BYTES.items(), key=lambda kv: -len(kv[0])):
    if device_kind.startswith(name):
      return size
  return None


def compile_train_step(s: builders.Setup, backend: str):
  """Lowers and compiles the sharded train step on `s.mesh`; returns (compiled, seconds)."""
  abstract, shardings, _ = builders.abstract_state(s)
  batch_sharding = sharding.batch_sharding(s.mesh, s.rules)
  shape = (s.config.train.batch_size, s.config.data.seq_len)
  batch = {
    "inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
    "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sharding),
    "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=batch_sharding),
  }
  t0 = time.perf_counter()
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules), attention.target_backend(backend):
    step = jax.jit(
      steps.make_train_step(s),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
    )
    compiled = step.lower(abstract, batch).compile()
  return compiled, time.perf_counter() - t0


def memory_report(compiled, hbm: int | None) -> dict:
  m = compiled.memory_analysis()
  # Donated state: outputs that alias arguments occupy no extra memory.
  total = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    - m.alias_size_in_bytes
    + m.temp_size_in_bytes
    + m.generated_code_size_in_bytes
  )
  return {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
    "code": m.generated_code_size_in_bytes,
    "total": total,
    "fits": hbm is not None and total <= hbm,
  }
