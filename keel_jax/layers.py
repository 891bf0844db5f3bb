"""Transformer building blocks: norms, RoPE, grouped-query attention, FFN.

Shape suffixes: B batch, T sequence, D model width, H query heads, K kv heads,
G = H/K query heads per kv head, E head dim, F FFN hidden width, V vocabulary.
Every parameter carries logical axis names; the model never sees a mesh.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any


def normal(std: float, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x_BxTxD, scale_D, eps: float):
  """x / rms(x) · scale over the last axis, in fp32."""
  return _rms_norm_fwd(x_BxTxD, scale_D, eps)[0]


def _rms_norm_fwd(x_BxTxD, scale_D, eps):
  r_BxTx1 = jax.lax.rsqrt(jnp.mean(x_BxTxD * x_BxTxD, axis=-1, keepdims=True) + eps)
  return x_BxTxD * r_BxTx1 * scale_D, (x_BxTxD, scale_D, r_BxTx1)


def _rms_norm_bwd(eps, residuals, dy_BxTxD):
  # The textbook gradient r·(g - x̂·mean(g·x̂)), g = dy·scale, x̂ = x·r, in x and r only, its
  # two reductions written as contractions. XLA:CPU materializes a reduction's broadcast
  # operands (r and scale at [B, T, D]) and shares them, and x̂, with the forward's, so under
  # remat each norm kept three activation-sized buffers from its recompute to this backward.
  # Autodiff's gradient ran 1.7x slower (2.9 vs 1.7 ms fwd+bwd at [8, 512, 512]).
  del eps
  x_BxTxD, scale_D, r_BxTx1 = residuals
  d = scale_D.shape[0]
  dyx_BxTxD = dy_BxTxD * x_BxTxD
  proj_BxTx1 = jnp.einsum("...d,d->...", dyx_BxTxD, scale_D)[..., None] / d
  dx_BxTxD = dy_BxTxD * scale_D * r_BxTx1 - x_BxTxD * (proj_BxTx1 * r_BxTx1**3)
  dscale_D = jnp.einsum("nd,n->d", dyx_BxTxD.reshape(-1, d), r_BxTx1.reshape(-1))
  return dx_BxTxD, dscale_D


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def normalize(kind: str, x_BxTxD, weights: dict, eps: float):
  """RMSNorm (x / rms(x) · scale) or LayerNorm (+ bias) over the last axis, in fp32."""
  x = x_BxTxD.astype(jnp.float32)
  if kind == "rmsnorm":
    return rms_norm(x, weights["scale"], eps)
  x = x - jnp.mean(x, axis=-1, keepdims=True)
  y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
  return y * weights["scale"] + weights["bias"]


class Norm(nn.Module):
  """RMSNorm (scale only, no bias) or LayerNorm over `features`, always computed in fp32.

  `eps_scale` multiplies ε, so that Norm(c·x, eps_scale=1/c²) == Norm(x) exactly.
  `weights()` returns the fp32 weights without normalizing anything: Keel's deferred LN_out
  (model.Block) applies them one block later.
  """

  features: int
  kind: str = "rmsnorm"
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32
  axis: str = "embed"  # logical axis name of the weights

  def setup(self):
    init = lambda f: nn.with_logical_partitioning(f, (self.axis,))
    shape = (self.features,)
    self.scale = self.param("scale", init(nn.initializers.ones), shape, self.param_dtype)
    if self.kind == "layernorm":
      self.bias = self.param("bias", init(nn.initializers.zeros), shape, self.param_dtype)

  def weights(self) -> dict:
    w = {"scale": self.scale.astype(jnp.float32)}
    if self.kind == "layernorm":
      w["bias"] = self.bias.astype(jnp.float32)
    return w

  def __call__(self, x, eps_scale: float = 1.0):
    return normalize(self.kind, x, self.weights(), self.eps * eps_scale)


def dense(x, w, contract: int = 1, preferred_element_type=None):
  """Contracts the last `contract` axes of `x` with the first of `w`, as one 2-D matmul.

  With the token axes flattened, each weight gradient contracts one axis. A gradient that
  contracts (batch, seq) made XLA:CPU transpose-copy the activation gradient first (measured:
  a 2-block d=512 train step without remat took 960 ms with einsums, 704 ms with this).
  """
  lead, out = x.shape[: x.ndim - contract], w.shape[contract:]
  k = math.prod(w.shape[:contract])
  y = jnp.matmul(x.reshape(-1, k), w.reshape(k, -1), preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)


def rope(x_BxTxNxE, positions_BxT, theta: float):
  """Rotary position embedding on the last axis (pairs are the two halves)."""
  e = x_BxTxNxE.shape[-1]
  freq_E2 = theta ** (-jnp.arange(0, e, 2, dtype=jnp.float32) / e)
  angle_BxTx1xE2 = (positions_BxT[..., None].astype(jnp.float32) * freq_E2)[:, :, None, :]
  sin, cos = jnp.sin(angle_BxTx1xE2), jnp.cos(angle_BxTx1xE2)
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxE.dtype)


def causal_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS):
  """Reference attention: fp32 softmax, a query sees keys at positions <= its own."""
  e = q_BxTxKxGxE.shape[-1]
  s_BxKxGxTxS = jnp.einsum(
    "btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=jnp.float32
  ) / jnp.sqrt(e).astype(jnp.float32)
  mask_Bx1x1xTxS = (k_pos_BxS[:, None, :] <= q_pos_BxT[:, :, None])[:, None, None]
  s_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
  p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxE.dtype)
  return jnp.einsum("bkgts,bske->btkge", p_BxKxGxTxS, v_BxSxKxE)


class Attention(nn.Module):
  """Causal multi-head attention with grouped KV heads and RoPE."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.0
  init_std: float = 0.02
  value_out_std: float = 0.02  # DeepNorm scales V and output inits by β
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_fn: Callable = causal_attention
  decode: bool = False  # keep a KV cache; the first (init) call sizes it to its length
  qkv_norm: str = ""  # "" | rmsnorm | layernorm: normalize each head's q, k, v (HybridNorm)
  norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BxTxD, positions_BxT):
    d = x_BxTxD.shape[-1]
    h, k, e = self.num_heads, self.num_kv_heads, self.head_dim
    p = lambda name, shape, names, std: self.param(
      name, normal(std, names), shape, self.param_dtype
    ).astype(self.dtype)
    wq_DxHxE = p("wq", (d, h, e), ("embed", "heads", "kv"), self.init_std)
    wk_DxKxE = p("wk", (d, k, e), ("embed", "heads", "kv"), self.init_std)
    wv_DxKxE = p("wv", (d, k, e), ("embed", "heads", "kv"), self.value_out_std)
    wo_HxExD = p("wo", (h, e, d), ("heads", "kv", "embed"), self.value_out_std)

    x = x_BxTxD.astype(self.dtype)
    q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (dense(x, w) for w in (wq_DxHxE, wk_DxKxE, wv_DxKxE))
    if self.qkv_norm:  # over each head's E features, one weight shared by the heads, before RoPE
      norm = lambda name, a: Norm(
        e, self.qkv_norm, self.norm_eps, self.param_dtype, axis="kv", name=f"{name}_norm"
      )(a).astype(self.dtype)
      q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = (
        norm(n, a) for n, a in (("q", q_BxTxHxE), ("k", k_BxTxKxE), ("v", v_BxTxKxE))
      )
    q_BxTxHxE = checkpoint_name(rope(q_BxTxHxE, positions_BxT, self.rope_theta), "query")
    k_BxTxKxE = checkpoint_name(rope(k_BxTxKxE, positions_BxT, self.rope_theta), "key")
    v_BxTxKxE = checkpoint_name(v_BxTxKxE, "value")

    b, t = positions_BxT.shape
    k_pos_BxS = positions_BxT
    if self.decode:
      k_BxTxKxE, v_BxTxKxE, k_pos_BxS = self._cached(k_BxTxKxE, v_BxTxKxE, positions_BxT)
    q_BxTxKxGxE = q_BxTxHxE.reshape(b, t, k, h // k, e)
    o_BxTxKxGxE = self.attention_fn(q_BxTxKxGxE, k_BxTxKxE, v_BxTxKxE, positions_BxT, k_pos_BxS)
    o_BxTxHxE = checkpoint_name(o_BxTxKxGxE.reshape(b, t, h, e), "attn_heads")
    out_BxTxD = dense(o_BxTxHxE, wo_HxExD, contract=2)
    return nn.with_logical_constraint(out_BxTxD, ("batch", "seq", "embed"))

  def _cached(self, k_BxTxKxE, v_BxTxKxE, positions_BxT):
    """The cache's keys/values with this call's in the next free slots.

    Each slot remembers its key's position (empty slots hold int32 max), so the
    causal rule k_pos <= q_pos also hides empty slots and left padding. The cache is only
    read here: the new entries go to collection "cache_new", and `append_to_cache` writes
    them into the stacked cache once per step (in place), where returning each layer's
    updated cache from the layer scan would rewrite the whole cache every token.
    """
    ready = self.has_variable("cache", "k")
    b, t, kh, e = k_BxTxKxE.shape
    k_c = self.variable("cache", "k", jnp.zeros, (b, t, kh, e), k_BxTxKxE.dtype)
    v_c = self.variable("cache", "v", jnp.zeros, (b, t, kh, e), v_BxTxKxE.dtype)
    pos_c = self.variable("cache", "pos", jnp.full, (b, t), jnp.iinfo(jnp.int32).max, jnp.int32)
    idx = self.variable("cache", "index", jnp.zeros, (), jnp.int32)
    pos_BxT = positions_BxT.astype(jnp.int32)
    if not ready:  # the init call only allocates
      return k_BxTxKxE, v_BxTxKxE, positions_BxT
    if self.is_mutable_collection("cache"):  # the cache would silently stay as it was
      raise ValueError(
        "decoding applies the model with mutable=['cache_new'] and writes it into the cache "
        "with layers.append_to_cache (see sample.decode_step), not mutable=['cache']"
      )
    for name, new in (("k", k_BxTxKxE), ("v", v_BxTxKxE), ("pos", pos_BxT)):
      self.put_variable("cache_new", name, new)
    i = idx.value
    return (
      jax.lax.dynamic_update_slice(k_c.value, k_BxTxKxE, (0, i, 0, 0)),
      jax.lax.dynamic_update_slice(v_c.value, v_BxTxKxE, (0, i, 0, 0)),
      jax.lax.dynamic_update_slice(pos_c.value, pos_BxT, (0, i)),
    )


def append_to_cache(cache, new):
  """The cache after a step: each attention's "cache_new" entries written at its index.

  A scanned attention's variables carry leading layer axes (as many as its index has); every
  layer of a stack is at the same index.
  """
  if "index" not in cache:
    return {name: append_to_cache(sub, new[name]) for name, sub in cache.items()}
  lead = cache["index"].ndim
  i = cache["index"].reshape(-1)[0]
  out = {"index": cache["index"] + new["pos"].shape[lead + 1]}
  for name in ("k", "v", "pos"):
    at = (0,) * (lead + 1) + (i,) + (0,) * (cache[name].ndim - lead - 2)
    out[name] = jax.lax.dynamic_update_slice(cache[name], new[name].astype(cache[name].dtype), at)
  return out


class FFN(nn.Module):
  """SwiGLU (three matrices, the paper's parameter count) or GELU (two)."""

  d_ff: int
  kind: str = "swiglu"
  init_std: float = 0.02  # DeepNorm scales all FFN inits by β
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    d = x_BxTxD.shape[-1]
    p = lambda name, shape, names: self.param(
      name, normal(self.init_std, names), shape, self.param_dtype
    ).astype(self.dtype)
    x = x_BxTxD.astype(self.dtype)
    if self.kind == "swiglu":
      gate_BxTxF = dense(x, p("w_gate", (d, self.d_ff), ("embed", "mlp")))
      up_BxTxF = dense(x, p("w_up", (d, self.d_ff), ("embed", "mlp")))
      h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
    else:
      h_BxTxF = jax.nn.gelu(dense(x, p("w_up", (d, self.d_ff), ("embed", "mlp"))))
    h_BxTxF = checkpoint_name(
      nn.with_logical_constraint(h_BxTxF, ("batch", "seq", "mlp")), "ffn_hidden"
    )
    out_BxTxD = dense(h_BxTxF, p("w_down", (self.d_ff, d), ("mlp", "embed")))
    return nn.with_logical_constraint(out_BxTxD, ("batch", "seq", "embed"))
