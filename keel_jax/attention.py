"""Causal attention implementations, all equal to `layers.causal_attention` (values and grads).

Every implementation takes `(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS)`; a query
sees the keys whose position is <= its own. The fast ones exploit the usual training layout
(self-attention, positions increasing along the sequence) and check at run time that it holds;
where it does not (KV-cache decoding, empty cache slots at int32 max, packed or shuffled
positions) they compute the reference instead.

  reference  the plain einsum/softmax of `layers.causal_attention`
  blocked    flash attention in plain JAX (any backend): query block i reads only key blocks
             0..i (fully masked blocks are skipped), and the backward recomputes probabilities
  sdpa       `jax.nn.dot_product_attention(is_causal=True)`: cuDNN flash attention on GPU
             (bf16/fp16), XLA elsewhere
  splash     the Pallas Splash attention kernel on TPU (TPU only)
  auto       the fastest correct one for the backend: blocked on CPU, sdpa on GPU, splash on TPU
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from keel_jax.layers import causal_attention

IMPLS = ("auto", "reference", "blocked", "sdpa", "splash")
# Per backend, what "auto" means; CPU's pick is measured by experiments/benchmark.py.
AUTO = {"cpu": "blocked", "gpu": "sdpa", "tpu": "splash"}
BLOCK = 64  # smallest query/key block of `blocked` (measured fastest at T=512 on CPU)
MAX_BLOCKS = 16


# JAX differentiates a plain cond by making both branches return both branches' residuals: the
# fast branch would fill the reference's [B, K, G, T, S] probabilities with zeros on every
# step (measured: up to 7% of a CPU train step at T=512; 5.7 GiB per v5p chip for keel_1024).
# Here the forward saves only the inputs and the backward differentiates the branch that ran,
# recomputing its forward.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _guarded(fast: Callable, ok, q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS):
  """`fast(...)` where the layout check `ok` holds, else the reference (one branch runs)."""
  args = (q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS)
  return jax.lax.cond(ok, fast, causal_attention, *args)


def _guarded_fwd(fast, ok, *args):
  return _guarded(fast, ok, *args), (ok, args)


def _guarded_bwd(fast, residuals, do_BxTxKxGxE):
  ok, (q, k, v, q_pos, k_pos) = residuals

  def grads(fn):
    return lambda: jax.vjp(lambda q, k, v: fn(q, k, v, q_pos, k_pos), q, k, v)[1](do_BxTxKxGxE)

  dq, dk, dv = jax.lax.cond(ok, grads(fast), grads(causal_attention))
  return None, dq, dk, dv, None, None  # no cotangent for the check or the integer positions


_guarded.defvjp(_guarded_fwd, _guarded_bwd)


def increasing_self_positions(q_pos_BxT, k_pos_BxS):
  """True iff queries and keys share strictly increasing positions (k_pos <= q_pos ⇔ s <= t)."""
  if q_pos_BxT.shape != k_pos_BxS.shape:
    return jnp.asarray(False)
  same = jnp.all(q_pos_BxT == k_pos_BxS)
  return same & jnp.all(q_pos_BxT[:, 1:] > q_pos_BxT[:, :-1])


# ---------------------------------------------------------------- blocked


def _block_bounds(pos_BxT, block: int, reduce, pad):
  """`reduce` of the positions in each block of `block` consecutive entries: [B, blocks]."""
  b, t = pos_BxT.shape
  n = -(-t // block)
  padded = jnp.pad(pos_BxT.astype(jnp.int32), ((0, 0), (0, n * block - t)), constant_values=pad)
  return reduce(padded.reshape(b, n, block), axis=-1)


def block_causal_layout(q_pos_BxT, k_pos_BxS, block: int):
  """True iff, cut into blocks, keys after a query's block are all hidden from it, keys before
  it all visible, and every query sees at least one key.

  Holds for increasing positions in self-attention; then no query needs a key past its block.
  """
  i32 = jnp.iinfo(jnp.int32)
  q_min_BxN = _block_bounds(q_pos_BxT, block, jnp.min, i32.max)
  q_max_BxN = _block_bounds(q_pos_BxT, block, jnp.max, i32.min)
  k_min_BxN = _block_bounds(k_pos_BxS, block, jnp.min, i32.max)
  k_max_BxN = _block_bounds(k_pos_BxS, block, jnp.max, i32.min)
  n = q_min_BxN.shape[1]
  i_NxN, j_NxN = jnp.arange(n)[:, None], jnp.arange(n)[None, :]  # [query block, key block]
  hidden_BxNxN = k_min_BxN[:, None, :] > q_max_BxN[:, :, None]
  visible_BxNxN = k_max_BxN[:, None, :] <= q_min_BxN[:, :, None]
  ok = jnp.all((hidden_BxNxN | (j_NxN <= i_NxN)) & (visible_BxNxN | (j_NxN >= i_NxN)))
  # Queries of the first block see no earlier block: each needs a visible key in its own.
  q0_BxC, k0_BxC = q_pos_BxT[:, :block], k_pos_BxS[:, :block]
  return ok & jnp.all(jnp.any(k0_BxC[:, None, :] <= q0_BxC[:, :, None], axis=-1))


# Inside flash attention, tensors are kv-head-major with each kv head's G query heads merged
# into the rows: Q [B, K, R, E] with R = T·G (row r is position r // G), K and V [B, K, S, E].
# Every product is then a plain batched matmul over (B, K). In the model's [B, T, K, G, E] layout
# XLA:CPU copied operands around every block's product (benchmark fwd+bwd at T=512: 144 ms
# before, 102 ms in this layout).


def _scores(q_BxKxRxE, k_BxKxPxE, q_pos_BxR, k_pos_BxP):
  """fp32 scores of a row block (queries pre-scaled) against its key prefix, causally masked.

  Masking the whole prefix costs one fused comparison and avoids splitting off the diagonal.
  """
  s_BxKxRxP = jnp.einsum(
    "bkre,bkpe->bkrp", q_BxKxRxE, k_BxKxPxE, preferred_element_type=jnp.float32
  )
  mask_Bx1xRxP = (k_pos_BxP[:, None, :] <= q_pos_BxR[:, :, None])[:, None]
  return jnp.where(mask_Bx1xRxP, s_BxKxRxP, jnp.finfo(jnp.float32).min)


def _flash_fwd(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, q_pos_BxR, k_pos_BxS, block):
  s, g = k_BxKxSxE.shape[2], q_BxKxRxE.shape[2] // k_BxKxSxE.shape[2]
  outs, lses = [], []
  for start in range(0, s, block):
    end = min(start + block, s)
    rows = slice(start * g, end * g)
    s_BxKxRxP = _scores(
      q_BxKxRxE[:, :, rows], k_BxKxSxE[:, :, :end], q_pos_BxR[:, rows], k_pos_BxS[:, :end]
    )
    m_BxKxRx1 = jnp.max(s_BxKxRxP, axis=-1, keepdims=True)
    p_BxKxRxP = jnp.exp(s_BxKxRxP - m_BxKxRx1)
    l_BxKxRx1 = jnp.sum(p_BxKxRxP, axis=-1, keepdims=True)
    # Normalize after the PV matmul: an [R, E] division instead of an [R, P] one.
    o_BxKxRxE = jnp.einsum(
      "bkrp,bkpe->bkre",
      p_BxKxRxP.astype(v_BxKxSxE.dtype),
      v_BxKxSxE[:, :, :end],
      preferred_element_type=jnp.float32,
    )
    outs.append((o_BxKxRxE / l_BxKxRx1).astype(v_BxKxSxE.dtype))
    lses.append((m_BxKxRx1 + jnp.log(l_BxKxRx1))[..., 0])
  o_BxKxRxE = jnp.concatenate(outs, axis=2)
  lse_BxKxR = jnp.concatenate(lses, axis=2)
  return o_BxKxRxE, (q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, q_pos_BxR, k_pos_BxS, o_BxKxRxE, lse_BxKxR)


def _flash_bwd(block, residuals, do_BxKxRxE):
  """Flash-attention backward: probabilities recomputed per block from the saved log-sum-exp."""
  q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, q_pos_BxR, k_pos_BxS, o_BxKxRxE, lse_BxKxR = residuals
  s, g = k_BxKxSxE.shape[2], q_BxKxRxE.shape[2] // k_BxKxSxE.shape[2]
  f32 = jnp.float32
  # Σ_p p·dp = Σ_e do·o: an [R, E] reduction instead of an [R, P] one.
  delta_BxKxR = jnp.sum(do_BxKxRxE.astype(f32) * o_BxKxRxE.astype(f32), axis=-1)
  dk_BxKxSxE = jnp.zeros(k_BxKxSxE.shape, f32)
  dv_BxKxSxE = jnp.zeros(v_BxKxSxE.shape, f32)
  dqs = []
  for start in range(0, s, block):
    end = min(start + block, s)
    rows = slice(start * g, end * g)
    q_blk, do_blk = q_BxKxRxE[:, :, rows], do_BxKxRxE[:, :, rows]
    k_BxKxPxE, v_BxKxPxE = k_BxKxSxE[:, :, :end], v_BxKxSxE[:, :, :end]
    s_BxKxRxP = _scores(q_blk, k_BxKxPxE, q_pos_BxR[:, rows], k_pos_BxS[:, :end])
    p_BxKxRxP = jnp.exp(s_BxKxRxP - lse_BxKxR[:, :, rows, None])
    dv_BxKxSxE = dv_BxKxSxE.at[:, :, :end].add(
      jnp.einsum(
        "bkrp,bkre->bkpe", p_BxKxRxP.astype(v_BxKxSxE.dtype), do_blk, preferred_element_type=f32
      )
    )
    dp_BxKxRxP = jnp.einsum("bkre,bkpe->bkrp", do_blk, v_BxKxPxE, preferred_element_type=f32)
    ds_BxKxRxP = p_BxKxRxP * (dp_BxKxRxP - delta_BxKxR[:, :, rows, None])
    ds_BxKxRxP = ds_BxKxRxP.astype(q_BxKxRxE.dtype)
    dqs.append(jnp.einsum("bkrp,bkpe->bkre", ds_BxKxRxP, k_BxKxPxE, preferred_element_type=f32))
    dk_BxKxSxE = dk_BxKxSxE.at[:, :, :end].add(
      jnp.einsum("bkrp,bkre->bkpe", ds_BxKxRxP, q_blk, preferred_element_type=f32)
    )
  dq_BxKxRxE = jnp.concatenate(dqs, axis=2).astype(q_BxKxRxE.dtype)
  # Positions are integers: no cotangent.
  return (
    dq_BxKxRxE,
    dk_BxKxSxE.astype(k_BxKxSxE.dtype),
    dv_BxKxSxE.astype(v_BxKxSxE.dtype),
    None,
    None,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash_rows(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, q_pos_BxR, k_pos_BxS, block):
  return _flash_fwd(q_BxKxRxE, k_BxKxSxE, v_BxKxSxE, q_pos_BxR, k_pos_BxS, block)[0]


_flash_rows.defvjp(_flash_fwd, _flash_bwd)


def _flash(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS, block):
  """Flash attention in the model's layout: one transpose per tensor in and out."""
  b, t, kh, g, e = q_BxTxKxGxE.shape
  # The 1/√E score scale on the [R, E] queries, not on the [R, P] scores of every block.
  q_BxTxKxGxE = q_BxTxKxGxE * jnp.asarray(1.0 / e**0.5, q_BxTxKxGxE.dtype)
  q_BxKxRxE = jnp.einsum("btkge->bktge", q_BxTxKxGxE).reshape(b, kh, t * g, e)
  q_pos_BxR = jnp.repeat(q_pos_BxT, g, axis=1)
  o_BxKxRxE = _flash_rows(
    q_BxKxRxE,
    jnp.einsum("bske->bkse", k_BxSxKxE),
    jnp.einsum("bske->bkse", v_BxSxKxE),
    q_pos_BxR,
    k_pos_BxS,
    block,
  )
  return jnp.einsum("bktge->btkge", o_BxKxRxE.reshape(b, kh, t, g, e))


def block_size(t: int) -> int:
  """Query/key block for a sequence of t: ≥ 64 keeps the matmuls efficient on CPU, ≤ 16
  blocks keeps the unrolled graph (and its compile time) small."""
  return max(BLOCK, -(-t // MAX_BLOCKS))


def blocked_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS, block: int = 0):
  """Block-causal flash attention in plain JAX: query block i only reads key blocks 0..i, and
  fully masked blocks are never computed; the backward recomputes probabilities (custom VJP)."""
  args = (q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS)
  t, s = q_BxTxKxGxE.shape[1], k_BxSxKxE.shape[1]
  block = block or block_size(t)
  if t != s or t <= block:  # decoding against a cache, or a single block: nothing to skip
    return causal_attention(*args)
  fast = lambda *a: _flash(*a, block)
  return _guarded(fast, block_causal_layout(q_pos_BxT, k_pos_BxS, block), *args)


# ---------------------------------------------------------------- jax.nn.dot_product_attention


def _sdpa(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS):
  del q_pos_BxT, k_pos_BxS  # checked by the caller: the mask is the index-causal one
  b, t, kh, g, e = q_BxTxKxGxE.shape
  # Grouped heads as jax.nn expects: query head n uses kv head n // g.
  q_BxTxHxE = q_BxTxKxGxE.reshape(b, t, kh * g, e)
  # cuDNN needs q, k, v of one 16-bit dtype; XLA accepts anything.
  o_BxTxHxE = jax.nn.dot_product_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, is_causal=True)
  return o_BxTxHxE.reshape(b, t, kh, g, e).astype(v_BxSxKxE.dtype)


def sdpa_attention(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS):
  """jax.nn.dot_product_attention where positions are the plain causal layout, else reference."""
  args = (q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS)
  if q_BxTxKxGxE.shape[1] != k_BxSxKxE.shape[1]:
    return causal_attention(*args)
  return _guarded(_sdpa, increasing_self_positions(q_pos_BxT, k_pos_BxS), *args)


# ---------------------------------------------------------------- Splash (TPU)


def _splash_local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, interpret: bool):
  """Splash attention on one device's shard (index-causal mask)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b, t, kh, g, e = q_BxTxKxGxE.shape
  block = min(512, t)
  sizes = sa.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block,
    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
    block_q_dq=block, block_kv_dq=block,
  )  # fmt: skip
  mask = sa.MultiHeadMask([sa.CausalMask((t, t)) for _ in range(g)])
  # An MQA kernel per kv head: its g query heads share that head's keys and values.
  kernel = sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
  scale = (1.0 / jnp.sqrt(e).astype(jnp.float32)).astype(q_BxTxKxGxE.dtype)
  q_BxKxGxTxE = jnp.einsum("btkge->bkgte", q_BxTxKxGxE * scale)
  k_BxKxSxE = jnp.einsum("bske->bkse", k_BxSxKxE)
  v_BxKxSxE = jnp.einsum("bske->bkse", v_BxSxKxE)
  o_BxKxGxTxE = jax.vmap(jax.vmap(kernel))(q_BxKxGxTxE, k_BxKxSxE, v_BxKxSxE)
  return jnp.einsum("bkgte->btkge", o_BxKxGxTxE).astype(v_BxSxKxE.dtype)


def _splash(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS, interpret: bool = False):
  # The caller checked the layout: the mask is the index-causal one, positions are not needed.
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return local(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE)
  # XLA cannot partition a Pallas kernel: run one per shard, split over batch and kv heads as
  # the logical axis rules in scope say (sequence and head dim stay whole).
  batch, heads = nn.logical_to_mesh_axes(("batch", "heads"))
  if batch is None and heads is None and mesh.size > 1:
    # No rules in scope while tracing: one kernel would see the whole global batch on every
    # device. Plain-JAX flash attention lets XLA partition it instead.
    return _flash(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS,
                  block_size(q_BxTxKxGxE.shape[1]))  # fmt: skip
  q_spec, kv_spec = P(batch, None, heads, None, None), P(batch, None, heads, None)
  return jax.shard_map(
    local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec, check_vma=False
  )(q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE)


def splash_attention(
  q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS, interpret: bool = False
):
  """Pallas Splash attention (TPU; `interpret` runs it anywhere) for the plain causal layout."""
  args = (q_BxTxKxGxE, k_BxSxKxE, v_BxSxKxE, q_pos_BxT, k_pos_BxS)
  t = q_BxTxKxGxE.shape[1]
  # The kernel tiles the sequence by 128: other lengths, and decoding, use the reference.
  if t != k_BxSxKxE.shape[1] or t % 128:
    return causal_attention(*args)
  fast = functools.partial(_splash, interpret=interpret)
  return _guarded(fast, increasing_self_positions(q_pos_BxT, k_pos_BxS), *args)


# ---------------------------------------------------------------- choice


_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def target_backend(backend: str):
  """Resolve "auto" for `backend` while tracing, e.g. "tpu" when AOT-compiling on a CPU host."""
  token = _TARGET.set(backend)
  try:
    yield
  finally:
    _TARGET.reset(token)


def resolve(impl: str, backend: str | None = None) -> str:
  """The concrete implementation `impl` means on `backend` (default: the target backend)."""
  if impl not in IMPLS:
    raise ValueError(f"config.model.attention_impl={impl!r}; choose one of {IMPLS}")
  backend = backend or _TARGET.get() or jax.default_backend()
  if impl == "auto":
    return AUTO.get(backend, "blocked")
  if impl == "splash" and backend != "tpu":
    raise ValueError("config.model.attention_impl='splash' needs a TPU; use 'auto' or 'blocked'")
  return impl


def get(impl: str, backend: str | None = None) -> Callable:
  """The attention function for config.model.attention_impl on `backend`."""
  return {
    "reference": causal_attention,
    "blocked": blocked_attention,
    "sdpa": sdpa_attention,
    "splash": splash_attention,
  }[resolve(impl, backend)]
