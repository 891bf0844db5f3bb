"""Residual schemes: how one sub-layer F combines with the residual stream x.

This file is the paper's one idea. Every scheme is one line of `apply`:

    pre_ln    x + F(LN_in(x))
    post_ln   LN_out(x + F(x))
    deepnorm  LN_out(α·x + F(x))                α = (2N)^¼, N blocks
    sandwich  x + LN_out(F(LN_in(x)))           a.k.a. Peri-LN
    keel      LN_out(α·x + F(LN_in(x)))         α = L = 2N sub-layers
    hybridnorm  attention x + F(x) with q, k, v each normalized inside F;
                FFN h + F(h), h = LN_in(x)      (Zhuo et al. 2025, arXiv 2503.04598)

`layout` turns a scheme name into the stack of blocks, e.g. Keel's first block
(plain Pre-LN attention, α = 1 FFN) followed by N-1 full Keel blocks; Mix-LN as
Post-LN blocks under Pre-LN blocks. Each run of identical blocks is one scanned
segment, so a heterogeneous stack still compiles in O(1) time in depth.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

SCHEMES = ("keel", "pre_ln", "post_ln", "deepnorm", "sandwich", "mix_ln", "hybridnorm")
# Forms whose output is LN_out(z) of a residual sum z: their LN_out can be deferred (model.Block).
SUM_THEN_NORM = ("post_ln", "deepnorm", "keel")


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one sub-layer is wired: which residual form, and its carry weight α."""

  form: str  # pre_ln | post_ln | deepnorm | sandwich | keel | qkv_norm | norm_stream
  alpha: float = 1.0

  @property
  def norm_in(self) -> bool:
    return self.form in ("pre_ln", "sandwich", "keel", "norm_stream")

  @property
  def norm_out(self) -> bool:
    return self.form in ("post_ln", "deepnorm", "sandwich", "keel")


@dataclasses.dataclass(frozen=True)
class BlockRule:
  """The rules of a block's two sub-layers; `beta` scales some inits (DeepNorm)."""

  attn: Rule
  ffn: Rule
  beta: float = 1.0

  @property
  def qkv_norm(self) -> bool:
    return self.attn.form == "qkv_norm"


Norm = Callable[..., jnp.ndarray]  # norm(x, eps_scale=1.0)


def apply(rule: Rule, x, f: Callable, norm_in: Norm | None, norm_out: Norm | None):
  """One sub-layer update of the fp32 residual stream `x` with branch `f`.

  The branch runs in the compute dtype; its output is summed with `x` in fp32. It is tagged
  "branch" so that a remat policy can keep it (see model.remat_policy).
  """
  branch = lambda h: checkpoint_name(f(h), "branch").astype(jnp.float32)
  a = rule.alpha
  match rule.form:
    case "pre_ln":
      return x + branch(norm_in(x))
    case "post_ln":
      return norm_out(x + branch(x))
    case "deepnorm":
      return norm_out(a * x + branch(x))
    case "sandwich":
      return x + norm_out(branch(norm_in(x)))
    case "keel":
      # LN_out(α·x + F) computed as LN_out(x + F/α) with ε/α²: identical for any
      # scale-invariant norm, and keeps the stream at unit scale (no α ≈ 1000 sums).
      return norm_out(x + branch(norm_in(x)) / a, eps_scale=out_eps_scale(rule))
    case "qkv_norm":  # HybridNorm's attention: the norms are on q, k, v inside the branch
      return x + branch(x)
    case "norm_stream":  # HybridNorm's FFN: the stream itself is normalized first
      h = norm_in(x)
      return h + branch(h)
  raise ValueError(f"unknown residual form {rule.form!r}")


def out_eps_scale(rule: Rule) -> float:
  """LN_out's ε multiplier: Keel sums x + F/α, a 1/α-scaled copy of α·x + F."""
  return 1.0 / rule.alpha**2 if rule.form == "keel" else 1.0


SUBLAYERS_PER_BLOCK = 2  # attention, then FFN: the paper counts depth L in sub-layers


def sublayers(num_blocks: int) -> int:
  return SUBLAYERS_PER_BLOCK * num_blocks


def blocks(num_sublayers: int) -> int:
  """Blocks of `num_sublayers` sub-layers; ValueError unless it is a positive whole number."""
  n = int(num_sublayers)
  if n < SUBLAYERS_PER_BLOCK or n % SUBLAYERS_PER_BLOCK:
    raise ValueError(
      f"sub-layers={num_sublayers} must be a positive multiple of {SUBLAYERS_PER_BLOCK} "
      "(attention + FFN per block)"
    )
  return n // SUBLAYERS_PER_BLOCK


def keel_alpha(num_blocks: int, alpha: float = 0.0) -> float:
  """α = L, the number of sub-layers, unless overridden with alpha > 0."""
  return float(alpha) if alpha > 0 else float(sublayers(num_blocks))


def layout(
  scheme: str, num_blocks: int, *, keel_alpha_override: float = 0.0, mix_ln_fraction: float = 0.25
) -> list[tuple[BlockRule, int]]:
  """The stack as runs of identical blocks: [(block rule, how many), ...]."""
  n = num_blocks
  match scheme:
    case "pre_ln" | "post_ln" | "sandwich":
      segments = [(BlockRule(Rule(scheme), Rule(scheme)), n)]
    case "deepnorm":
      rule = Rule("deepnorm", alpha=(2.0 * n) ** 0.25)
      segments = [(BlockRule(rule, rule, beta=(8.0 * n) ** -0.25), n)]
    case "keel":
      # The paper's input-layer rule: the first attention sub-layer is plain Pre-LN,
      # the first FFN keeps Keel's form with α = 1; every later sub-layer is full Keel.
      full = Rule("keel", alpha=keel_alpha(n, keel_alpha_override))
      first = BlockRule(Rule("pre_ln"), Rule("keel", alpha=1.0))
      segments = [(first, 1), (BlockRule(full, full), n - 1)]
    case "hybridnorm":
      segments = [(BlockRule(Rule("qkv_norm"), Rule("norm_stream")), n)]
    case "mix_ln":
      n_post = math.floor(mix_ln_fraction * n)
      segments = [
        (BlockRule(Rule("post_ln"), Rule("post_ln")), n_post),
        (BlockRule(Rule("pre_ln"), Rule("pre_ln")), n - n_post),
      ]
    case _:
      raise ValueError(f"unknown residual scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
  return [(rule, count) for rule, count in segments if count > 0]
