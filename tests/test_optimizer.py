"""Optimizer tests: schedule values at known steps, decay mask, clipping, AdamW vs a reference."""

from __future__ import annotations

import importlib.util
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from keel_jax import optimizer as opt
from keel_jax.model import LM, ModelConfig

PEAK, FLOOR, N, W = 1e-3, 1e-5, 100, 10


def default_train_cfg():
  """config.train of configs/default.py, loaded by path (the repo root may not be on sys.path)."""
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")
  spec = importlib.util.spec_from_file_location("keel_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().train


def train_cfg(**overrides):
  t = default_train_cfg()
  base = dict(learning_rate=PEAK, min_learning_rate=FLOOR, num_steps=N, warmup_steps=W)
  t.update({**base, "decay_fraction": 0.2, **overrides})
  return t


def lr_at(name, steps, **overrides):
  fn = opt.schedule(train_cfg(schedule=name, **overrides))
  return np.array([float(fn(jnp.int32(s))) for s in steps])


# ------------------------------------------------------------------ schedules


@pytest.mark.parametrize("name", opt.SCHEDULES)
def test_warmup_is_linear_from_zero_to_peak(name):
  np.testing.assert_allclose(lr_at(name, [0, W // 2, W]), [0.0, PEAK / 2, PEAK], rtol=1e-6)


@pytest.mark.parametrize("name", opt.SCHEDULES)
def test_never_increases_after_warmup(name):
  lrs = lr_at(name, range(W, N + 20))
  assert np.all(np.diff(lrs) <= 1e-12)
  assert np.all(lrs >= FLOOR * (1 - 1e-6))


@pytest.mark.parametrize(
  "name, step, expected",
  [
    ("cosine", (N + W) // 2, (PEAK + FLOOR) / 2),  # half-way through the decay
    ("cosine", N, FLOOR),
    ("cosine", N + 50, FLOOR),  # past the end: stays on the floor
    ("linear", (N + W) // 2, (PEAK + FLOOR) / 2),
    ("linear", N, FLOOR),
    ("wsd", W + 1, PEAK),  # plateau ...
    ("wsd", N - 20, PEAK),  # ... until the last decay_fraction·num_steps = 20 steps
    ("wsd", N - 10, (PEAK + FLOOR) / 2),
    ("wsd", N, FLOOR),
    ("rsqrt", 4 * W, PEAK / 2),  # lr·sqrt(warmup/step)
    ("rsqrt", 100 * W, PEAK / 10),
    ("constant", N, PEAK),
  ],
)
def test_schedule_value(name, step, expected):
  np.testing.assert_allclose(lr_at(name, [step])[0], expected, rtol=1e-5)


def test_no_warmup_starts_at_peak():
  np.testing.assert_allclose(lr_at("cosine", [0, N], warmup_steps=0), [PEAK, FLOOR], rtol=1e-6)


def test_paper_schedule_from_default_config():
  t = default_train_cfg()
  opt.validate(t)
  fn = opt.schedule(t)
  assert float(fn(0)) == 0.0
  np.testing.assert_allclose(float(fn(t.warmup_steps)), t.learning_rate, rtol=1e-6)
  np.testing.assert_allclose(float(fn(t.num_steps)), t.min_learning_rate, rtol=1e-5)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
  "overrides, field",
  [
    (dict(schedule="step"), "schedule"),
    (dict(warmup_steps=N + 1), "warmup_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(learning_rate=-1e-3), "learning_rate"),
    (dict(min_learning_rate=2 * PEAK), "min_learning_rate"),
    (dict(b1=1.0), "b1"),
    (dict(b2=1.0), "b2"),
    (dict(b2=0.0), "b2"),
    (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(mu_dtype="float16"), "mu_dtype"),
    (dict(nu_dtype="bf16"), "nu_dtype"),
    (dict(schedule="wsd", decay_fraction=0.0), "decay_fraction"),
    (dict(schedule="wsd", warmup_steps=90, decay_fraction=0.2), "warmup_steps"),
  ],
)
def test_invalid_settings_raise_one_line(overrides, field):
  with pytest.raises(ValueError) as e:
    opt.optimizer(train_cfg(**overrides))
  msg = str(e.value)
  assert msg.startswith(f"config.train.{field}=") and "\n" not in msg


def test_unknown_schedule_lists_choices():
  with pytest.raises(ValueError, match="choose one of") as e:
    opt.schedule(train_cfg(schedule="step"))
  assert all(name in str(e.value) for name in opt.SCHEDULES)


# ------------------------------------------------------------------ decay mask


def test_decay_mask_on_the_model_tree():
  cfg = ModelConfig(  # layernorm: norms with biases too
    vocab_size=64, d_model=16, num_heads=2, num_kv_heads=1, num_blocks=2, norm="layernorm"
  )
  shapes = jax.eval_shape(LM(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  params = shapes["params"]
  mask = opt.decay_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)  # optax.masked needs this
  flat = {
    jax.tree_util.keystr(path): m
    for path, m in jax.tree_util.tree_flatten_with_path(nn.unbox(opt.decay_mask(params)))[0]
  }
  decayed = {k.split("['")[-1].rstrip("']") for k, m in flat.items() if m}
  kept = {k.split("['")[-1].rstrip("']") for k, m in flat.items() if not m}
  assert decayed == {"embed", "head", "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
  assert kept == {"scale", "bias"}
  # Stacked by scan, a norm scale is 2-D: excluded by name, not by rank.
  assert any(m is False and "attn_norm" in k for k, m in flat.items())


def test_decay_mask_by_name_and_rank():
  params = {
    "dense": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones((4,))},
    "gain": jnp.ones((4,)),
    "temperature": jnp.ones(()),
    "rmsnorm": {"scale": jnp.ones((2, 4))},
    "stacked": {"kernel": jnp.ones((2, 3, 4)), "bias": jnp.ones((2, 4))},  # scanned: 2 layers
  }
  assert opt.decay_mask(params) == {
    "dense": {"kernel": True, "bias": False},
    "gain": False,
    "temperature": False,
    "rmsnorm": {"scale": False},
    "stacked": {"kernel": True, "bias": False},
  }


# ------------------------------------------------------------------ AdamW and clipping


def test_clipping_rescales_gradients_to_max_norm():
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.array([[3.0, 0.0], [0.0, 4.0]])}  # global norm 5
  for clip, scale in ((1.0, 1 / 5), (10.0, 1.0), (0.0, 1.0)):
    tx = opt.optimizer(train_cfg(grad_clip=clip))
    _, state = tx.update(grads, tx.init(params), params)
    mu = state[1][0].mu["w"]  # AdamW's first moment saw the clipped gradient
    np.testing.assert_allclose(mu, (1 - 0.9) * scale * grads["w"], rtol=1e-6)


def test_adamw_matches_reference():
  t = train_cfg(schedule="cosine", grad_clip=0.0, weight_decay=0.1, warmup_steps=1, num_steps=5)
  tx, lr = opt.optimizer(t), opt.schedule(t)
  rng = np.random.default_rng(0)
  init = {"w": rng.normal(size=(2, 3)), "norm": {"scale": rng.normal(size=(3,))}}
  params = jax.tree.map(jnp.float32, init)
  state = tx.init(params)
  # AdamW by hand in float64, leaf by leaf: bias-corrected moments, eps outside the sqrt,
  # decay decoupled from the moments and scaled by lr; the norm scale is not decayed.
  ref = {
    name: {"p": p, "m": 0.0, "v": 0.0}
    for name, p in (("w", init["w"]), ("scale", init["norm"]["scale"]))
  }
  decays = {"w": t.weight_decay, "scale": 0.0}
  for step in range(4):
    g = {"w": rng.normal(size=(2, 3)), "norm": {"scale": rng.normal(size=(3,))}}
    updates, state = tx.update(jax.tree.map(jnp.float32, g), state, params)
    params = optax.apply_updates(params, updates)
    for name, g_leaf in (("w", g["w"]), ("scale", g["norm"]["scale"])):
      r, k = ref[name], step + 1
      r["m"] = t.b1 * r["m"] + (1 - t.b1) * g_leaf
      r["v"] = t.b2 * r["v"] + (1 - t.b2) * g_leaf**2
      adam = (r["m"] / (1 - t.b1**k)) / (np.sqrt(r["v"] / (1 - t.b2**k)) + t.eps)
      r["p"] = r["p"] - float(lr(step)) * (adam + decays[name] * r["p"])
  np.testing.assert_allclose(params["w"], ref["w"]["p"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(params["norm"]["scale"], ref["scale"]["p"], rtol=1e-5, atol=1e-7)
  assert float(lr(0)) == 0.0 and not np.allclose(params["w"], init["w"], atol=1e-4)


def test_bf16_moments_stay_bf16_and_track_fp32():
  """mu_dtype/nu_dtype store both moments in bf16 through updates; the parameters then follow
  the fp32 run to bf16 precision, and the state floor drops from 16 to 12 bytes per param."""
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}
  runs = {}
  for dtype in ("", "bfloat16"):
    t = train_cfg(schedule="constant", warmup_steps=0, mu_dtype=dtype, nu_dtype=dtype)
    tx, p = opt.optimizer(t), params
    state = tx.init(p)
    for step in range(5):
      g = {"w": jnp.asarray(np.random.default_rng(step).normal(size=(4, 8)), jnp.float32)}
      updates, state = tx.update(g, state, p)
      p = optax.apply_updates(p, updates)
    adam = state[1][0]
    runs[dtype] = (p["w"], adam.mu["w"].dtype, adam.nu["w"].dtype, opt.state_bytes_per_param(t))
  assert runs[""][1:] == (jnp.float32, jnp.float32, 16)
  assert runs["bfloat16"][1:] == (jnp.bfloat16, jnp.bfloat16, 12)
  moved = np.abs(np.asarray(runs[""][0] - params["w"])).max()
  diff = np.abs(np.asarray(runs["bfloat16"][0] - runs[""][0])).max()
  assert 0 < diff < 0.05 * moved  # different rounding, same trajectory


def test_adamw_equals_optax_adamw_and_bf16_updates_read_the_stored_moments():
  """With fp32 moments our AdamW is optax.adamw bit for bit, with the same state tree (so
  checkpoints match); with bf16 moments the update is Adam's formula on the moments as stored
  (rounded to bf16), computed in fp32."""
  t = train_cfg(schedule="cosine", grad_clip=0.0, weight_decay=0.1, warmup_steps=1, num_steps=5)
  rng = np.random.default_rng(2)
  params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "norm": jnp.ones((4,))}
  grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)]
  grads += [jax.tree.map(lambda x: 1e-3 * x, grads[0])]
  ours = opt.optimizer(t)
  theirs = optax.chain(
    optax.identity(),
    optax.adamw(
      opt.schedule(t), t.b1, t.b2, t.eps, weight_decay=t.weight_decay, mask=opt.decay_mask
    ),
  )
  states = [ours.init(params), theirs.init(params)]
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  for g in grads:
    u0, states[0] = ours.update(g, states[0], params)
    u1, states[1] = theirs.update(g, states[1], params)
    chex.assert_trees_all_equal(u0, u1)
    chex.assert_trees_all_equal(states[0], states[1])

  t.update(mu_dtype="bfloat16", nu_dtype="bfloat16", weight_decay=0.0)
  tx, lr = opt.optimizer(t), opt.schedule(t)
  state = tx.init(params)
  for g in grads:
    updates, state = tx.update(g, state, params)
  adam, k = state[1][0], len(grads)
  for name in params:
    mu, nu = (np.asarray(m[name], np.float32) for m in (adam.mu, adam.nu))
    want = -float(lr(k - 1)) * (mu / (1 - t.b1**k)) / (np.sqrt(nu / (1 - t.b2**k)) + t.eps)
    assert updates[name].dtype == jnp.float32 and adam.mu[name].dtype == jnp.bfloat16
    np.testing.assert_allclose(updates[name], want, rtol=1e-6)


def test_clipping_equals_optax_clip_by_global_norm():
  """Our fused-friendly clip is optax's clip_by_global_norm (same values, same empty state)."""
  tree = {"a": jnp.arange(6.0).reshape(2, 3) - 2.5, "b": jnp.full((4,), 0.3)}
  for max_norm in (0.1, 1.0, 100.0):
    ours, theirs = opt.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))
    got, _ = ours.update(tree, ours.init(tree))
    want, _ = theirs.update(tree, theirs.init(tree))
    chex.assert_trees_all_close(got, want, rtol=1e-6)
  zeros = jax.tree.map(jnp.zeros_like, tree)
  got, _ = opt.clip_by_global_norm(1.0).update(zeros, optax.EmptyState())
  chex.assert_trees_all_equal(got, zeros)  # a zero gradient stays zero, not NaN


def test_bf16_moments_add_no_temporaries_to_the_compiled_step():
  """Reading only the stored moments lets XLA update them in place: the donated step's
  temporaries are no larger with bf16 moments than with fp32 ones (reading the unrounded
  fp32 moments made it copy the bf16 ones first: 1.20 vs 1.06 MB at this shape)."""
  from experiments import benchmark

  temp = {}
  for dtype in ("", "bfloat16"):
    model = dict(d_model=64, num_heads=2, num_kv_heads=1, num_blocks=4, nested_remat=True)
    s = benchmark.make_setup(model, 16, 1, {"mu_dtype": dtype, "nu_dtype": dtype})
    compiled, _ = benchmark.compile_step(s)
    temp[dtype] = compiled.memory_analysis().temp_size_in_bytes
  assert temp["bfloat16"] <= temp[""], temp
