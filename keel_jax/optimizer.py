"""Optimizer: global-norm clipping, then AdamW with a named learning-rate schedule.

Everything is read from `config.train`; weight decay skips norms, biases and 1-D parameters.
`mu_dtype` / `nu_dtype` store Adam's moments in bfloat16 (half the optimizer state); the
update itself is computed in float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("cosine", "wsd", "linear", "rsqrt", "constant")
MOMENT_DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _wsd_decay_steps(t) -> int:
  return max(1, round(t.decay_fraction * t.num_steps))


def validate(t) -> None:
  """Raises ValueError naming the `config.train` field to change."""

  def need(ok: bool, msg: str):
    if not ok:
      raise ValueError(f"config.train.{msg}")

  need(t.schedule in SCHEDULES, f"schedule={t.schedule!r} is unknown; choose one of {SCHEDULES}")
  need(t.num_steps >= 1, f"num_steps={t.num_steps} must be >= 1")
  need(
    0 <= t.warmup_steps <= t.num_steps,
    f"warmup_steps={t.warmup_steps} must be in [0, num_steps={t.num_steps}]",
  )
  need(t.learning_rate > 0, f"learning_rate={t.learning_rate} must be > 0")
  need(
    0 <= t.min_learning_rate <= t.learning_rate,
    f"min_learning_rate={t.min_learning_rate} must be in [0, learning_rate={t.learning_rate}]",
  )
  need(0 <= t.b1 < 1, f"b1={t.b1} must be in [0, 1)")
  need(0 < t.b2 < 1, f"b2={t.b2} must be in (0, 1)")
  need(t.eps > 0, f"eps={t.eps} must be > 0")
  need(t.weight_decay >= 0, f"weight_decay={t.weight_decay} must be >= 0")
  need(t.grad_clip >= 0, f"grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
  for name in ("mu_dtype", "nu_dtype"):
    value = t.get(name, "")
    need(
      value in MOMENT_DTYPES,
      f"{name}={value!r} is unknown; choose one of {list(MOMENT_DTYPES)} ('' = the params')",
    )
  if t.schedule == "wsd":
    need(0 < t.decay_fraction <= 1, f"decay_fraction={t.decay_fraction} must be in (0, 1]")
    decay = _wsd_decay_steps(t)
    need(
      t.warmup_steps + decay <= t.num_steps,
      f"warmup_steps={t.warmup_steps} + wsd decay {decay} (decay_fraction·num_steps) "
      f"must not exceed num_steps={t.num_steps}",
    )


def schedule(t) -> optax.Schedule:
  """Learning rate at step: linear warm-up from 0 to the peak, then `t.schedule`'s decay."""
  validate(t)
  peak, floor = float(t.learning_rate), float(t.min_learning_rate)
  n, w = int(t.num_steps), int(t.warmup_steps)

  def linear_to_floor(step, start, length):
    frac = jnp.clip((step - start) / max(length, 1), 0.0, 1.0)
    return peak + (floor - peak) * frac

  def cosine(step):
    frac = jnp.clip((step - w) / max(n - w, 1), 0.0, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(math.pi * frac))

  def wsd(step):
    decay = _wsd_decay_steps(t)
    return linear_to_floor(step, n - decay, decay)  # == peak until the decay starts

  def rsqrt(step):
    w1 = max(w, 1)
    return jnp.maximum(floor, peak * jnp.sqrt(w1 / jnp.maximum(step, w1)))

  after_warmup = {
    "cosine": cosine,
    "wsd": wsd,
    "linear": lambda step: linear_to_floor(step, w, n - w),
    "rsqrt": rsqrt,
    "constant": lambda step: jnp.full_like(step, peak),
  }[t.schedule]

  def lr(count):
    step = jnp.asarray(count, jnp.float32)
    return jnp.where(step < w, peak * step / max(w, 1), after_warmup(step))

  return lr


def decay_mask(params):
  """True where AdamW applies weight decay: not norms, biases, or parameters with ndim <= 1.

  Scanned layers stack parameters on a leading axis, so a per-layer norm scale is 2-D there:
  the name, not the rank, is what excludes it.
  """

  def decays(path, x) -> bool:
    name = jax.tree_util.keystr(path).lower()
    return not ("norm" in name or "bias" in name or len(x.shape) <= 1)

  return jax.tree_util.tree_map_with_path(decays, params)


def scale_by_adam(b1: float, b2: float, eps: float, mu_dtype=None, nu_dtype=None):
  """optax.scale_by_adam (same state) with both moments stored in `mu_dtype` / `nu_dtype`
  and the update computed, in the gradients' dtype, from the moments *as stored*.

  Optax computes the update from the unrounded new moments; XLA then recomputes those inside
  the in-place update from the old moments, a second read of them that makes it copy every
  moment buffer first. Reading only the stored moments avoids the copies. With no moment
  dtype set the values are optax's, bit for bit (a test checks).
  """

  def init(params):
    return optax.ScaleByAdamState(
      count=jnp.zeros([], jnp.int32),
      mu=optax.tree.zeros_like(params, dtype=mu_dtype),
      nu=optax.tree.zeros_like(params, dtype=nu_dtype),
    )

  def update(updates, state, params=None):
    del params
    mu = optax.tree.cast(optax.tree.update_moment(updates, state.mu, b1, 1), mu_dtype)
    nu = optax.tree.cast(optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2), nu_dtype)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(optax.tree.cast_like(mu, updates), b1, count)
    nu_hat = optax.tree.bias_correction(optax.tree.cast_like(nu, updates), b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """Scales the gradients by min(1, max_norm / global norm): optax's clip_by_global_norm as
  one multiply by a scalar, which XLA fuses into AdamW's update; optax's select-or-divide
  form is materialized, one more parameter-sized buffer. Same (empty) state as optax's."""

  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(t) -> optax.GradientTransformation:
  """clip_by_global_norm(t.grad_clip) → AdamW(t.b1, t.b2, t.eps, t.weight_decay) at schedule(t),
  its moments stored in t.mu_dtype / t.nu_dtype ('' = the parameters' dtype)."""
  validate(t)
  # Same state structure with clipping on or off, so a checkpoint restores either way.
  clip = clip_by_global_norm(t.grad_clip) if t.grad_clip > 0 else optax.identity()
  dtype = lambda name: MOMENT_DTYPES[t.get(name, "")]
  # optax.adamw's chain, with its Adam replaced: the same state tree, so checkpoints match.
  adamw = optax.chain(
    scale_by_adam(t.b1, t.b2, t.eps, dtype("mu_dtype"), dtype("nu_dtype")),
    optax.add_decayed_weights(t.weight_decay, decay_mask),
    optax.scale_by_learning_rate(schedule(t)),
  )
  return optax.chain(clip, adamw)


def state_bytes_per_param(t, param_bytes: int = 4) -> int:
  """Bytes per parameter of params + grads + Adam's two moments under `t` (the state floor)."""
  moment = lambda name: jnp.dtype(MOMENT_DTYPES[t.get(name, "")] or jnp.float32).itemsize
  return 2 * param_bytes + moment("mu_dtype") + moment("nu_dtype")
