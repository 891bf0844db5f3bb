"""Decoder-only LM: embedding → segments of scanned blocks → final norm → head.

A block is two sub-layers (attention, FFN), each wired by a `residual.Rule`.
The stack is a list of segments (runs of identical blocks, see
`residual.layout`); each segment is one `nn.scan` over a rematerialized block,
with parameters stacked on a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from keel_jax import attention, residual
from keel_jax.layers import FFN, Attention, Norm, dense, normal, normalize

# "auto": the trainer picks one of the others by compiled memory (keel_jax.remat_auto).
REMAT_POLICIES = ("none", "full", "branch", "dots", "dots_no_batch", "names", "auto")
# Activations tagged with checkpoint_name (layers.py, residual.py), for remat_policy="names".
REMAT_NAMES = ("query", "key", "value", "attn_heads", "ffn_hidden", "branch")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Model hyper-parameters: the schema and defaults of `config.model` (configs/default.py
  starts from `defaults()`)."""

  vocab_size: int = 0  # 0 → the tokenizer's, rounded up to 64 (keel_jax.builders.model_config)
  d_model: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2  # grouped-query attention: num_heads % num_kv_heads == 0
  head_dim: int = 0  # 0 → d_model // num_heads
  d_ff: int = 0  # 0 → 3·d_model (the paper's 1024 → 3072)
  ffn: str = "swiglu"  # swiglu | gelu
  num_blocks: int = 8  # sub-layers = 2·num_blocks
  residual: str = "keel"  # one of residual.SCHEMES
  keel_alpha: float = 0.0  # 0 → α = 2·num_blocks (the paper's α = L)
  mix_ln_fraction: float = 0.25  # Mix-LN: fraction of blocks (from the bottom) that are Post-LN
  norm: str = "rmsnorm"  # rmsnorm | layernorm
  norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  init_std: float = 0.02
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype of matmuls; norms, softmax, logits and the stream are fp32
  param_dtype: str = "float32"
  scan_layers: bool = True  # False unrolls (same math and parameters, slow to compile)
  remat_policy: str = "full"  # one of REMAT_POLICIES; "auto" is resolved by the trainer
  remat_save_names: tuple[str, ...] = ()  # with remat_policy="names": some of REMAT_NAMES
  nested_remat: bool = False  # √L nested remat: keep ~2√L carries instead of L
  attention_impl: str = "auto"  # one of attention.IMPLS; auto → the fastest correct one

  def __post_init__(self):
    if self.vocab_size == 0:
      raise ValueError(
        "config.model.vocab_size=0 (automatic) must be resolved from the tokenizer first "
        "(keel_jax.builders.model_config), or set to >= 1"
      )
    for name in ("vocab_size", "d_model", "num_heads", "num_kv_heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"config.model.{name}={getattr(self, name)!r} must be a positive int")
    for name in ("head_dim", "d_ff"):
      if getattr(self, name) == 0:
        default = self.d_model // self.num_heads if name == "head_dim" else 3 * self.d_model
        object.__setattr__(self, name, default)
    object.__setattr__(self, "remat_save_names", tuple(self.remat_save_names))
    self.validate()

  @classmethod
  def defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}

  @classmethod
  def from_dict(cls, d) -> ModelConfig:
    d = dict(d)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"unknown config.model keys {unknown}; remove them or check the spelling")
    return cls(**d)

  def validate(self):
    def need(ok, msg):
      if not ok:
        raise ValueError(msg)

    need(
      self.residual in residual.SCHEMES,
      f"config.model.residual={self.residual!r} is unknown; choose one of {residual.SCHEMES}",
    )
    need(self.num_blocks >= 1, f"config.model.num_blocks={self.num_blocks} must be >= 1")
    need(
      self.d_model % self.num_heads == 0,
      f"config.model.num_heads={self.num_heads} must divide d_model={self.d_model}",
    )
    need(
      self.num_heads % self.num_kv_heads == 0,
      f"config.model.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}",
    )
    need(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
    need(self.ffn in ("swiglu", "gelu"), f"config.model.ffn={self.ffn!r}: use swiglu or gelu")
    need(
      self.norm in ("rmsnorm", "layernorm"),
      f"config.model.norm={self.norm!r}: use rmsnorm or layernorm",
    )
    need(
      self.dtype in DTYPES and self.param_dtype in DTYPES,
      f"config.model.dtype/param_dtype must be one of {list(DTYPES)}",
    )
    need(
      self.remat_policy in REMAT_POLICIES,
      f"config.model.remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}",
    )
    need(
      self.remat_policy != "names" or self.remat_save_names,
      "config.model.remat_policy='names' needs config.model.remat_save_names",
    )
    unknown = sorted(set(self.remat_save_names) - set(REMAT_NAMES))
    need(
      not unknown,
      f"config.model.remat_save_names has unknown {unknown}; choose from {REMAT_NAMES}",
    )
    need(
      self.keel_alpha == 0 or self.keel_alpha > 1,
      f"config.model.keel_alpha={self.keel_alpha}: the paper needs α > 1 (0 means α = L)",
    )
    need(0.0 <= self.mix_ln_fraction <= 1.0, "config.model.mix_ln_fraction must be in [0, 1]")
    need(
      self.attention_impl in attention.IMPLS,
      f"config.model.attention_impl={self.attention_impl!r}; choose one of {attention.IMPLS}",
    )

  @property
  def num_sublayers(self) -> int:
    return residual.sublayers(self.num_blocks)

  def layout(self) -> list[tuple[residual.BlockRule, int]]:
    return residual.layout(
      self.residual,
      self.num_blocks,
      keel_alpha_override=self.keel_alpha,
      mix_ln_fraction=self.mix_ln_fraction,
    )


Carry = tuple  # (z [B, T, D], norm weights, pending): the stream is LN(z) if pending else z


def settle(cfg: ModelConfig, rule: residual.BlockRule, carry: Carry):
  """The residual stream from a carry: applies a deferred LN_out (see Block)."""
  z_BxTxD, weights, pending = carry
  if rule.ffn.form not in residual.SUM_THEN_NORM:
    return z_BxTxD
  eps = cfg.norm_eps * residual.out_eps_scale(rule.ffn)
  return jnp.where(pending, normalize(cfg.norm, z_BxTxD, weights, eps), z_BxTxD)


def start_carry(cfg: ModelConfig, x_BxTxD) -> Carry:
  ones = jnp.ones((cfg.d_model,), jnp.float32)
  weights = {"scale": ones} if cfg.norm == "rmsnorm" else {"scale": ones, "bias": 0 * ones}
  return x_BxTxD, weights, jnp.zeros((), bool)


def hand_over(
  cfg: ModelConfig, rule: residual.BlockRule, next_rule: residual.BlockRule | None, carry: Carry
) -> Carry:
  """A segment's last carry as the next segment's first (next_rule None: after the stack).

  A deferred LN_out stays deferred where the next segment's blocks apply one too: its z is
  rescaled to their ε (LN(c·z) with ε·c² is LN(z) with ε), so no boundary keeps both z and
  LN_out(z) for the backward. Elsewhere the stream is settled here.
  """
  sums = lambda r: r is not None and r.ffn.form in residual.SUM_THEN_NORM
  if not sums(rule):
    return carry
  if not sums(next_rule):
    return start_carry(cfg, settle(cfg, rule, carry))
  z_BxTxD, weights, pending = carry
  c = math.sqrt(residual.out_eps_scale(next_rule.ffn) / residual.out_eps_scale(rule.ffn))
  return z_BxTxD * jnp.where(pending, c, 1.0), weights, pending


class Block(nn.Module):
  """One Transformer block: attention then FFN sub-layer, each wired by its rule.

  Where the FFN sub-layer ends in LN_out(z) (Keel, Post-LN, DeepNorm), the block returns z and
  LN_out's weights instead, and the next block (or `hand_over`, after the stack) applies
  LN_out. The scan then saves z as its carry, which is exactly what LN_out's backward needs:
  under full remat the backward recomputes no branch output, just as for Pre-LN (whose x + F
  passes the gradient straight through). Same math, same parameters.
  """

  cfg: ModelConfig
  rule: residual.BlockRule
  decode: bool = False

  @nn.compact
  def __call__(self, carry: Carry, positions_BxT, keep_2=None):
    cfg, rule = self.cfg, self.rule
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    beta_std = cfg.init_std * rule.beta
    attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta,
                     init_std=cfg.init_std, value_out_std=beta_std, dtype=dtype,
                     param_dtype=param_dtype, attention_fn=attention.get(cfg.attention_impl),
                     decode=self.decode, qkv_norm=cfg.norm if rule.qkv_norm else "",
                     norm_eps=cfg.norm_eps, name="attn")  # fmt: skip
    ffn = FFN(cfg.d_ff, cfg.ffn, beta_std, dtype, param_dtype, name="ffn")

    def norms(name, sub_rule):
      norm = lambda suffix: Norm(
        cfg.d_model, cfg.norm, cfg.norm_eps, param_dtype, name=f"{name}_norm_{suffix}"
      )
      return norm("in") if sub_rule.norm_in else None, norm("out") if sub_rule.norm_out else None

    # keep_2[i] == 0 removes sub-layer i: the stream passes through (layer-removal studies).
    kept = lambda i: True if keep_2 is None else keep_2[i] > 0
    constrain = lambda a: nn.with_logical_constraint(a, ("batch", "seq", "embed"))
    rms = lambda a: jnp.sqrt(jnp.mean(jnp.square(a)))

    x_BxTxD = settle(cfg, rule, carry)
    y_BxTxD = residual.apply(rule.attn, x_BxTxD, lambda h: attn(h, positions_BxT),
                             *norms("attn", rule.attn))  # fmt: skip
    x_BxTxD = constrain(jnp.where(kept(0), y_BxTxD, x_BxTxD))
    rms_attn = rms(x_BxTxD)

    norm_in, norm_out = norms("ffn", rule.ffn)
    _, weights, _ = carry
    if rule.ffn.form in residual.SUM_THEN_NORM:
      z_BxTxD = residual.apply(rule.ffn, x_BxTxD, ffn, norm_in, lambda z, eps_scale=1.0: z)
      carry = (
        constrain(jnp.where(kept(1), z_BxTxD, x_BxTxD)),
        norm_out.weights(),
        jnp.asarray(kept(1)),
      )
    else:
      y_BxTxD = residual.apply(rule.ffn, x_BxTxD, ffn, norm_in, norm_out)
      carry = (constrain(jnp.where(kept(1), y_BxTxD, x_BxTxD)), weights, jnp.zeros((), bool))
    # Activation RMS after each sub-layer, for gradient-flow studies (stacked by scan).
    self.sow("intermediates", "rms", jnp.stack([rms_attn, rms(settle(cfg, rule, carry))]))
    return carry, None


def remat_policy(cfg: ModelConfig):
  cp = jax.checkpoint_policies
  return {
    "full": cp.nothing_saveable,
    # Not resolved by the trainer: only forward passes (eval, sampling) get here, where no
    # policy changes the result.
    "auto": cp.nothing_saveable,
    # Full remat, but each sub-layer's branch output F is kept (one [B, T, D] in the compute
    # dtype per sub-layer): the backward then recomputes neither output projection.
    "branch": cp.save_only_these_names("branch"),
    "dots": cp.dots_saveable,
    "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
    "names": cp.save_only_these_names(*cfg.remat_save_names),
  }[cfg.remat_policy]


def scan(module_cls, length: int, axis: str = "layers"):
  """`module_cls` applied `length` times, parameters stacked on a leading `axis`."""
  return nn.scan(
    module_cls,
    variable_axes={"params": 0, "intermediates": 0, "cache": 0, "cache_new": 0},
    split_rngs={"params": True},
    in_axes=(nn.broadcast, 0),  # positions; per-block keep mask (or None)
    length=length,
    metadata_params={nn.PARTITION_NAME: axis},
  )


def nested_split(n: int) -> tuple[int, int]:
  """(groups, group size) for √L nested remat; n - groups·size blocks run as a plain tail.

  An exact factorization n = groups·size is preferred while its live carries (groups + size)
  stay within twice the √n split's: a tail means slicing the stacked parameters, which copies
  them, and concatenating their gradients, which copies those (two parameter-sized buffers).
  """
  size = max(1, round(math.sqrt(n)))
  groups = n // size
  if groups * size == n:
    return groups, size
  exact = [(n // d, d) for d in range(2, n) if n % d == 0]
  best = min(exact, key=sum, default=None)
  if best and sum(best) <= 2 * (groups + size + n - groups * size):
    return best
  return groups, size


def nested_groups(cfg: ModelConfig, n: int) -> tuple[int, int]:
  """(groups, group size) of a segment of n blocks under cfg; (0, 0) when not nested."""
  groups, size = nested_split(n) if cfg.nested_remat and cfg.scan_layers else (0, 0)
  return (groups, size) if groups > 1 and size > 1 else (0, 0)


class Group(nn.Module):
  """A scanned run of `length` identical blocks (the inner loop of nested remat)."""

  cfg: ModelConfig
  rule: residual.BlockRule
  length: int
  decode: bool = False

  @nn.compact
  def __call__(self, carry, positions_BxT, keep_Nx2=None):
    block = Block
    if self.cfg.remat_policy != "none":
      block = nn.remat(Block, policy=remat_policy(self.cfg), prevent_cse=False)
    body = scan(block, self.length)(self.cfg, self.rule, self.decode, name="blocks")
    return body(carry, positions_BxT, keep_Nx2)


class Stack(nn.Module):
  """`length` identical blocks as the memory settings lay them out: scanned (`main`), nested
  remat (`groups` of scanned runs, then `main`), or unrolled (`block_i`). Its parameters are
  stored in one layout whatever these settings say (see Segment)."""

  cfg: ModelConfig
  rule: residual.BlockRule
  length: int
  decode: bool = False

  @nn.compact
  def __call__(self, carry, positions_BxT, keep_Nx2=None):
    cfg, n = self.cfg, self.length
    if not cfg.scan_layers:
      for i in range(n):
        keep_2 = None if keep_Nx2 is None else keep_Nx2[i]
        block = Block(cfg, self.rule, self.decode, name=f"block_{i}")
        carry, _ = block(carry, positions_BxT, keep_2)
      return carry
    groups, size = nested_groups(cfg, n)
    if groups:
      # Outer scan saves only one carry per group; each group's inner scan is
      # recomputed during the backward pass, so ~groups + size carries are live.
      # Its own axis name: a spec may not name `layers` twice.
      outer = scan(nn.remat(Group, prevent_cse=False), groups, axis="layer_groups")
      keep_GxSx2 = None
      if keep_Nx2 is not None:
        keep_GxSx2 = keep_Nx2[: groups * size].reshape(groups, size, 2)
        keep_Nx2 = keep_Nx2[groups * size :]
      outer = outer(cfg, self.rule, size, self.decode, name="groups")
      carry, _ = outer(carry, positions_BxT, keep_GxSx2)
      n -= groups * size
      if n == 0:
        return carry
    carry, _ = Group(cfg, self.rule, n, self.decode, name="main")(carry, positions_BxT, keep_Nx2)
    return carry


def _value(a):
  return a.value if isinstance(a, nn.meta.Partitioned) else a


def _relayout(tree, value_fn, names_fn):
  """Maps each leaf's value (and, for boxed leaves, its logical axis names)."""
  box = lambda a: isinstance(a, nn.meta.Partitioned)
  one = lambda a: (
    a.replace(value=value_fn(a.value), names=names_fn(a.names)) if box(a) else (value_fn(a))
  )
  return jax.tree.map(one, tree, is_leaf=box)


def stored_layout(view: dict) -> dict:
  """A Stack's parameters, as its settings lay them out → {"blocks": leaves [n, ...]}."""
  if not view:
    return view
  if "block_0" in view:
    blocks = [view[f"block_{i}"] for i in range(len(view))]
    stacked = jax.tree.map(
      lambda *a: _relayout(
        a[0], lambda _: jnp.stack([_value(b) for b in a]), lambda n: ("layers", *n)
      ),
      *blocks,
      is_leaf=lambda a: isinstance(a, nn.meta.Partitioned),
    )
    return {"blocks": stacked}
  parts = []
  if "groups" in view:
    parts.append(
      _relayout(view["groups"]["blocks"], lambda a: a.reshape(-1, *a.shape[2:]), lambda n: n[1:])
    )
  if "main" in view:
    parts.append(view["main"]["blocks"])
  box = lambda a: isinstance(a, nn.meta.Partitioned)
  concat = lambda *a: _relayout(
    a[0], lambda _: jnp.concatenate([_value(b) for b in a]), lambda n: n
  )
  return {"blocks": jax.tree.map(concat, *parts, is_leaf=box)}


def view_layout(cfg: ModelConfig, n: int, stored: dict) -> dict:
  """{"blocks": leaves [n, ...]} → the layout `Stack` builds under cfg's memory settings."""
  if not stored:
    return stored
  blocks = stored["blocks"]
  if not cfg.scan_layers:
    return {f"block_{i}": _relayout(blocks, lambda a, i=i: a[i], lambda n: n[1:]) for i in range(n)}
  groups, size = nested_groups(cfg, n)
  if not groups:
    return {"main": {"blocks": blocks}}
  split = groups * size
  view = {
    "groups": {
      "blocks": _relayout(
        blocks,
        lambda a: a[:split].reshape(groups, size, *a.shape[1:]),
        lambda n: ("layer_groups", *n),
      )
    }
  }
  if split < n:
    view["main"] = {"blocks": _relayout(blocks, lambda a: a[split:], lambda n: n)}
  return view


class Segment(nn.Module):
  """`length` identical blocks. Their parameters are stored stacked `[length, ...]` under
  `stack/blocks` whatever scan_layers and nested_remat say, so a run can change those
  settings and resume; `Stack` sees them reshaped or sliced to its own layout."""

  cfg: ModelConfig
  rule: residual.BlockRule
  length: int
  decode: bool = False
  next_rule: residual.BlockRule | None = None  # the next segment's blocks (see hand_over)

  @nn.compact
  def __call__(self, carry: Carry, positions_BxT, keep_Nx2=None) -> Carry:
    cfg, n = self.cfg, self.length
    per_collection = lambda fn: lambda cols: {k: fn(v) for k, v in cols.items()}
    stack = nn.map_variables(
      Stack,
      "params",
      trans_in_fn=per_collection(functools.partial(view_layout, cfg, n)),
      trans_out_fn=per_collection(stored_layout),
      init=self.is_initializing(),
    )(cfg, self.rule, n, self.decode, name="stack")

    def run(mdl, carry, positions_BxT):
      return hand_over(cfg, self.rule, self.next_rule, mdl(carry, positions_BxT, keep_Nx2))

    # Only a rematerialized training forward has a recompute to hold back.
    remat = cfg.scan_layers and cfg.remat_policy != "none" and not self.decode
    plain = self.is_initializing() or self.is_mutable_collection("intermediates")
    if self.next_rule and remat and keep_Nx2 is None and not plain:
      run = hold_backward(run)
    z_BxTxD, weights, pending = run(stack, carry, positions_BxT)
    return nn.with_logical_constraint(z_BxTxD, ("batch", "seq", "embed")), weights, pending


def hold_backward(fn):
  """fn(module, carry, positions) whose backward starts only once the output's cotangent exists.

  The backward of a rematerialized segment recomputes its forward from saved inputs that are
  ready long before the later segments' backward has produced this segment's cotangent, and XLA
  then hoists the recompute, so its activations are live beside the later segment's backward
  (a lone first Keel block: one block's activations extra). Making the saved values depend on
  the cotangent ties the recompute to it. Same values and grads (a non-finite g[0, 0, 0] makes
  this segment's grads non-finite, as it would through any real path).
  """

  def forward(mdl, carry, positions_BxT):
    return nn.vjp(fn, mdl, carry, positions_BxT)

  def backward(vjp_fn, g_carry):
    # A data dependence, which XLA's scheduler cannot reorder (it drops optimization barriers
    # on CPU): every saved float gets 0·g[0, 0, 0] added. x·0 is not folded for floats.
    g_BxTxD = g_carry[0]
    zero = 0.0 * g_BxTxD[(0,) * g_BxTxD.ndim]
    floating = lambda r: isinstance(r, jax.Array) and jnp.issubdtype(r.dtype, jnp.floating)
    tie = lambda r: r + zero.astype(r.dtype) if floating(r) else r
    return jax.tree.map(tie, vjp_fn)(g_carry)

  return nn.custom_vjp(fn, forward_fn=forward, backward_fn=backward)


class LM(nn.Module):
  """Causal language model; returns fp32 logits [B, T, V].

  With decode=True every attention reads a KV cache (collection "cache", stacked on the
  layers axis) and puts this call's keys/values in collection "cache_new", which
  `layers.append_to_cache` writes into it; `positions_BxT` then places the new tokens.
  `sublayer_mask` ([2·num_blocks] of 0/1, order attn_0, ffn_0, ...): where 0 the
  sub-layer is removed (x_{l+1} = x_l); None runs every sub-layer.
  """

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT=None, sublayer_mask=None):
    cfg = self.cfg
    param_dtype, dtype = DTYPES[cfg.param_dtype], DTYPES[cfg.dtype]
    chex.assert_rank(tokens_BxT, 2)
    chex.assert_type(tokens_BxT, int)
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    chex.assert_equal_shape((tokens_BxT, positions_BxT))
    if sublayer_mask is not None:
      chex.assert_shape(sublayer_mask, (cfg.num_sublayers,))
    # The table is sharded on one mesh axis only: a gather from a table sharded on
    # two axes makes XLA rematerialize the whole table.
    embed_VxD = self.param(
      "embed",
      normal(cfg.init_std, ("vocab", "table_embed")),
      (cfg.vocab_size, cfg.d_model),
      param_dtype,
    )
    # The residual stream stays fp32: at α ≈ 1000 a bf16 stream would drop F entirely.
    x_BxTxD = jnp.take(embed_VxD, tokens_BxT, axis=0).astype(jnp.float32)
    x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "seq", "embed"))
    keep_Nx2 = None
    if sublayer_mask is not None:
      keep_Nx2 = jnp.asarray(sublayer_mask, jnp.float32).reshape(cfg.num_blocks, 2)
    start, carry = 0, start_carry(cfg, x_BxTxD)
    layout = cfg.layout()
    for i, (rule, length) in enumerate(layout):
      keep = None if keep_Nx2 is None else keep_Nx2[start : start + length]
      start += length
      next_rule = layout[i + 1][0] if i + 1 < len(layout) else None
      segment = Segment(cfg, rule, length, self.decode, next_rule, name=f"segment_{i}")
      carry = segment(carry, positions_BxT, keep)
    x_BxTxD = carry[0]  # settled: the last segment has no next rule
    x_BxTxD = Norm(cfg.d_model, cfg.norm, cfg.norm_eps, param_dtype, name="final_norm")(x_BxTxD)
    if cfg.tie_embeddings:
      head_DxV = embed_VxD.T
    else:
      head_DxV = self.param(
        "head", normal(cfg.init_std, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size), param_dtype
      )
    logits_BxTxV = dense(
      x_BxTxD.astype(dtype), head_DxV.astype(dtype), preferred_element_type=jnp.float32
    )
    return nn.with_logical_constraint(logits_BxTxV, ("batch", "seq", "vocab"))


# ---------------------------------------------------------------- introspection


def _per_block(tree) -> Any:
  """A segment's subtree → the same leaves with one leading axis of blocks, in depth order.

  Parameters (and grads) are always stored `stack/blocks`; sown intermediates keep the
  layout the memory settings built (see Stack).
  """
  tree = tree["stack"]
  if "blocks" in tree:
    return tree["blocks"]
  if "block_0" in tree:  # unrolled
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f"block_{i}"] for i in range(len(tree))])
  parts = []
  if "groups" in tree:  # nested remat: [groups, group size, ...]
    parts.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), tree["groups"]["blocks"]))
  if "main" in tree:
    parts.append(tree["main"]["blocks"])
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def segments(tree) -> list[Any]:
  """Per segment, a params-like tree (params, grads, intermediates) with blocks on axis 0."""
  tree = nn.unbox(tree)
  n = sum(k.startswith("segment_") for k in tree)
  return [_per_block(tree[f"segment_{i}"]) for i in range(n)]


def sublayer_norms(params_like, rms: bool = False) -> jnp.ndarray:
  """L2 norm (or RMS) of each sub-layer's parameters (or grads), shape [2·num_blocks].

  Reduces stacked leaves over their non-layer axes: no unrolling, cheap under jit.
  Order is attn_0, ffn_0, attn_1, ffn_1, ...
  """
  out = []
  for seg in segments(params_like):
    sq, size = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(seg)[0]:
      kind = "attn" if str(path[0].key).startswith("attn") else "ffn"
      leaf_sq = jnp.sum(jnp.square(leaf.astype(jnp.float32)).reshape(leaf.shape[0], -1), axis=1)
      sq[kind] = sq.get(kind, 0.0) + leaf_sq
      size[kind] = size.get(kind, 0) + leaf.size // leaf.shape[0]
    if rms:
      sq = {k: v / size[k] for k, v in sq.items()}
    out.append(jnp.stack([sq["attn"], sq["ffn"]], axis=1).reshape(-1))
  return jnp.sqrt(jnp.concatenate(out))


def sublayer_activation_rms(intermediates) -> jnp.ndarray:
  """Residual-stream RMS after each sub-layer, shape [2·num_blocks], from sown intermediates."""
  return jnp.concatenate([seg["rms"][0].reshape(-1) for seg in segments(intermediates)])
