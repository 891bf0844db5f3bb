"""Model FLOPs counted by hand (XLA's cost analysis undercounts scanned loops) and device peaks."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from keel_jax.model import ModelConfig

# Nominal dense bf16 peak per chip, FLOP/s (vendor figures).
NOMINAL_PEAK = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5": 459e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
}


def matmul_params(cfg: ModelConfig) -> int:
  """Parameters that take part in a matmul per token (everything but the embedding gather)."""
  d, e = cfg.d_model, cfg.head_dim
  attn = d * e * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  ffn = (3 if cfg.ffn == "swiglu" else 2) * d * cfg.d_ff
  return cfg.num_blocks * (attn + ffn) + d * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """6·N for the matmuls plus causal attention (QKᵀ and PV, half the square masked)."""
  attention = 2 * 2 * seq_len * cfg.num_heads * cfg.head_dim * cfg.num_blocks / 2
  return 3 * (2 * matmul_params(cfg) + attention)


def is_matmul(eqn) -> bool:
  """A dot_general with a free dimension on both sides: a matrix product, not a contraction
  with a vector (such as a norm's backward reductions)."""
  if eqn.primitive.name != "dot_general":
    return False
  (contract_l, contract_r), (batch_l, batch_r) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval.ndim for v in eqn.invars)
  return lhs > len(contract_l) + len(batch_l) and rhs > len(contract_r) + len(batch_r)


def count_matmuls(jaxpr, times: int = 1) -> int:
  """Matrix products a jaxpr executes: nested bodies included, scan bodies × their length."""
  n = 0
  for eqn in jaxpr.eqns:
    n += times * is_matmul(eqn)
    inner = times * eqn.params["length"] if eqn.primitive.name == "scan" else times
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          n += count_matmuls(sub, inner)
  return n


def nominal_peak(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for name, peak in sorted(NOMINAL_PEAK.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(name):
      return peak
  return None


def matmul_chain(n: int, repeats: int = 10, dtype=jnp.float32):
  """(jitted chain of `repeats` n×n matmuls, compiled and warm; its input; its FLOPs)."""
  a = jnp.ones((n, n), dtype) / n
  f = jax.jit(lambda x: jax.lax.fori_loop(0, repeats, lambda _, y: y @ a, x))
  f(a).block_until_ready()
  return f, a, 2 * n**3 * repeats


def measured_matmul_peak(n: int = 1024, repeats: int = 10, dtype=jnp.float32) -> float:
  """FLOP/s of a jitted n×n matmul chain on the default device (best of a few runs)."""
  f, a, flop = matmul_chain(n, repeats, dtype)
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return flop / best


def device_peak() -> tuple[float, str]:
  """The peak MFU is measured against: nominal on TPU/GPU, measured on CPU."""
  peak = nominal_peak()
  if peak is not None:
    return peak * jax.device_count(), "nominal"
  # CPU: fake devices share the same cores, so the process's peak is the machine's.
  return measured_matmul_peak(), "measured"
