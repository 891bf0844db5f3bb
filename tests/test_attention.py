"""Every attention implementation against the reference `layers.causal_attention`.

Values and gradients, grouped-query shapes, and positions of every kind: the training layout
(where the fast paths run), shifted, packed, shuffled, KV-cache slots holding int32 max, and
queries that see no key at all (where the fast paths must fall back to the reference).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keel_jax import attention
from keel_jax.layers import causal_attention
from keel_jax.model import LM, ModelConfig

B, T, K, G, E = 2, 200, 2, 2, 16  # T: three full 64-blocks and a partial one
I32_MAX = np.iinfo(np.int32).max


def qkv(seed=0, b=B, t=T, s=T, e=E, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, t, K, G, e), dtype)
  k = jax.random.normal(kk, (b, s, K, e), dtype)
  v = jax.random.normal(kv, (b, s, K, e), dtype)
  return q, k, v


def positions(kind: str, b=B, t=T):
  """[B, T] query positions and the keys' positions for one layout."""
  ar = np.broadcast_to(np.arange(t), (b, t)).copy()
  if kind == "train":
    return ar, ar
  if kind == "shifted":  # e.g. a continuation: still increasing
    return ar + 37, ar + 37
  if kind == "packed":  # two documents, positions restart: blocks are no longer causal-ordered
    p = np.concatenate([np.arange(t // 2), np.arange(t - t // 2)])
    return np.broadcast_to(p, (b, t)).copy(), np.broadcast_to(p, (b, t)).copy()
  if kind == "shuffled":
    p = np.stack([np.random.default_rng(i).permutation(t) for i in range(b)])
    return p, p
  if kind == "cache":  # a KV cache with empty slots (int32 max) after the filled ones
    k = np.where(ar < 3 * t // 4, ar, I32_MAX)
    return ar, k
  if kind == "blind":  # the first queries see no key: the reference averages all values
    return ar - 5, ar
  raise ValueError(kind)


KINDS = ("train", "shifted", "packed", "shuffled", "cache", "blind")


def loss(fn, q, k, v, q_pos, k_pos):
  o = fn(q, k, v, q_pos, k_pos)
  # A non-linear read-out so gradients differ per element.
  return jnp.sum(jnp.sin(o.astype(jnp.float32)) * jnp.linspace(0.5, 1.5, o.size).reshape(o.shape))


@functools.cache
def value_and_grad(fn):
  return jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))


IMPLS = {
  "blocked": attention.blocked_attention,
  "sdpa": attention.sdpa_attention,
  "splash_interpret": functools.partial(attention.splash_attention, interpret=True),
}


def assert_close(got, want, rtol=1e-5, atol=1e-5):
  """Same tree structure and shapes; leaves close (chex compares bfloat16 leaves in float32)."""
  chex.assert_trees_all_equal_shapes(got, want)
  chex.assert_trees_all_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("impl", ["blocked", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(impl, kind):
  q, k, v = qkv()
  q_pos, k_pos = positions(kind)
  assert_close(
    value_and_grad(IMPLS[impl])(q, k, v, q_pos, k_pos),
    value_and_grad(causal_attention)(q, k, v, q_pos, k_pos),
  )


@pytest.mark.parametrize("kind", ["train", "shuffled", "cache"])
def test_splash_interpret_matches_reference(kind):
  # The TPU kernel run by the Pallas interpreter: same math as on a TPU, checked on CPU.
  q, k, v = qkv(b=1, t=256, s=256, e=128)
  q_pos, k_pos = positions(kind, b=1, t=256)
  assert_close(
    value_and_grad(IMPLS["splash_interpret"])(q, k, v, q_pos, k_pos),
    value_and_grad(causal_attention)(q, k, v, q_pos, k_pos),
    rtol=2e-5,
    atol=2e-5,
  )


def test_fast_path_alone_matches_reference():
  # The fallback could hide a wrong fast path: check the flash kernel without it.
  q, k, v = qkv(1)
  q_pos, k_pos = positions("shifted")
  fast = lambda *a: attention._flash(*a, 64)
  assert_close(
    value_and_grad(fast)(q, k, v, q_pos, k_pos),
    value_and_grad(causal_attention)(q, k, v, q_pos, k_pos),
  )


@pytest.mark.parametrize(
  "kind, expected",
  [("train", True), ("shifted", True), ("packed", False), ("shuffled", False),
   ("cache", False), ("blind", False)],
)  # fmt: skip
def test_layout_check(kind, expected):
  """The fast path runs exactly where it is exact."""
  q_pos, k_pos = positions(kind)
  assert bool(attention.block_causal_layout(jnp.asarray(q_pos), jnp.asarray(k_pos), 64)) is expected
  assert bool(attention.increasing_self_positions(jnp.asarray(q_pos), jnp.asarray(k_pos))) is (
    kind in ("train", "shifted")
  )


@pytest.mark.parametrize("impl", ["blocked", "sdpa"])
def test_decode_against_cache(impl):
  """One new token per sequence against a cache whose empty slots hold int32 max."""
  q, _, _ = qkv(2, t=1)
  _, k, v = qkv(3)
  q_pos = np.array([[120], [37]])
  k_pos = np.where(np.arange(T)[None] <= q_pos, np.arange(T)[None], I32_MAX)
  assert_close(
    value_and_grad(IMPLS[impl])(q, k, v, q_pos, k_pos),
    value_and_grad(causal_attention)(q, k, v, q_pos, k_pos),
  )


def test_blocked_bfloat16():
  q, k, v = qkv(4, dtype=jnp.bfloat16)
  q_pos, k_pos = positions("train")
  got = value_and_grad(attention.blocked_attention)(q, k, v, q_pos, k_pos)
  want = value_and_grad(causal_attention)(q, k, v, q_pos, k_pos)
  # bf16 keeps ~3 significant digits; both sides round differently.
  assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_resolve():
  assert attention.resolve("auto", "cpu") == "blocked"
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("auto", "gpu") == "sdpa"
  assert attention.get("reference", "cpu") is causal_attention
  with pytest.raises(ValueError, match="needs a TPU"):
    attention.resolve("splash", "cpu")
  with pytest.raises(ValueError, match="attention_impl"):
    ModelConfig(vocab_size=64, attention_impl="flash9")


def test_model_blocked_equals_reference():
  """The knob reaches the model: same loss and gradients, and the fast path is really used."""
  base = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, num_blocks=2)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 160), 0, 64)

  def loss_and_grads(impl):
    model = LM(ModelConfig(**base, attention_impl=impl))
    params = model.init(jax.random.PRNGKey(1), tokens[:, :8])["params"]
    f = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)
    return jax.jit(jax.value_and_grad(f))(params), jax.make_jaxpr(f)(params)

  (got, jaxpr_blocked), (want, jaxpr_ref) = loss_and_grads("blocked"), loss_and_grads("reference")
  assert_close(got, want)
  # The flash kernel's custom VJP by name: RMSNorm has a custom VJP of its own.
  assert "name=_flash_rows" in str(jaxpr_blocked) and "name=_flash_rows" not in str(jaxpr_ref)
