"""Paper-reproduction experiments: the sub-layer mask, divergence detection, every ci run.

The ci runs go through the real command line (`python -m experiments.<name>`) and assert only
what is robust at their size: the run completes, every table has every row, Keel has no NaN.
They share one XLA cache directory, so runs of identical models compile once.
"""

from __future__ import annotations

import csv
import importlib
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import experiment
from experiments import lr_sweep
from keel_jax.model import LM, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("depth_scaling", "lr_sweep", "grad_flow", "layer_redundancy", "deep_run")
TINY = dict(vocab_size=48, d_model=16, num_heads=4, num_kv_heads=2, num_blocks=4)
B, T = 2, 10


# ---------------------------------------------------------------- sub-layer mask


def random_params(cfg: ModelConfig, seed: int = 0):
  """The model's parameter tree filled with values large enough that every sub-layer matters."""
  shapes = jax.eval_shape(LM(cfg).init, jax.random.key(0), jnp.zeros((1, T), jnp.int32))
  leaves, treedef = jax.tree_util.tree_flatten_with_path(nn.unbox(shapes["params"]))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys, strict=True):
    if path[-1].key == "scale":
      out.append(jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5))
    else:
      std = 1.0 if path[-1].key == "embed" else 0.3
      out.append(std * jax.random.normal(key, leaf.shape))
  return jax.tree_util.tree_unflatten(treedef, out)


def ref_rms(x, scale):
  return x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * scale


def ref_rope(x_BxTxNxE, theta=10_000.0):
  e = x_BxTxNxE.shape[-1]
  angle_TxE2 = jnp.arange(x_BxTxNxE.shape[1])[:, None] * theta ** (-jnp.arange(0, e, 2) / e)
  sin, cos = jnp.sin(angle_TxE2)[None, :, None], jnp.cos(angle_TxE2)[None, :, None]
  x1, x2 = jnp.split(x_BxTxNxE, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_attention(p, x_BxTxD):
  h, k = p["wq"].shape[1], p["wk"].shape[1]
  q = ref_rope(jnp.einsum("btd,dhe->bthe", x_BxTxD, p["wq"]))
  kk = jnp.repeat(ref_rope(jnp.einsum("btd,dke->btke", x_BxTxD, p["wk"])), h // k, axis=2)
  v = jnp.repeat(jnp.einsum("btd,dke->btke", x_BxTxD, p["wv"]), h // k, axis=2)
  s = jnp.einsum("bthe,bshe->bhts", q, kk) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((x_BxTxD.shape[1],) * 2, bool))
  a = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), -1)
  return jnp.einsum("bhts,bshe,hed->btd", a, v, p["wo"])


def ref_ffn(p, x_BxTxD):
  return (jax.nn.silu(x_BxTxD @ p["w_gate"]) * (x_BxTxD @ p["w_up"])) @ p["w_down"]


def ref_forward(scheme: str, cfg: ModelConfig, params, tokens_BxT, keep):
  """Unrolled forward from the schemes' formulas (arXiv 2601.19895, Sec. 3) that skips every
  sub-layer with keep == 0."""
  n, big_l = cfg.num_blocks, 2 * cfg.num_blocks
  per_block = []
  for name in sorted(k for k in params if k.startswith("segment_")):  # Keel: [first] + rest
    stacked = params[name]["stack"]["blocks"]
    length = jax.tree.leaves(stacked)[0].shape[0]
    per_block += [jax.tree.map(lambda a, j=j: a[j], stacked) for j in range(length)]
  assert len(per_block) == n
  x = params["embed"][tokens_BxT]
  for b, p in enumerate(per_block):
    for i, (kind, f) in enumerate((("attn", ref_attention), ("ffn", ref_ffn))):
      if not keep[2 * b + i]:
        continue
      n_in = lambda h, kind=kind, p=p: ref_rms(h, p[f"{kind}_norm_in"]["scale"])
      n_out = lambda h, kind=kind, p=p: ref_rms(h, p[f"{kind}_norm_out"]["scale"])
      branch = lambda h, kind=kind, f=f, p=p: f(p[kind], h)
      if scheme == "pre_ln" or (scheme == "keel" and b == 0 and kind == "attn"):
        x = x + branch(n_in(x))
      elif scheme == "post_ln":
        x = n_out(x + branch(x))
      else:  # keel: α = L, except α = 1 in the first block's FFN
        alpha = 1.0 if b == 0 else float(big_l)
        x = n_out(alpha * x + branch(n_in(x)))
  return ref_rms(x, params["final_norm"]["scale"]) @ params["head"]


def tokens():
  return jax.random.randint(jax.random.key(3), (B, T), 0, TINY["vocab_size"])


LAYOUTS = [dict(), dict(scan_layers=False), dict(num_blocks=6, nested_remat=True)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_of_ones_equals_no_mask(layout):
  cfg = ModelConfig(**{**TINY, **layout})
  params = random_params(cfg)
  model = LM(cfg)
  plain = model.apply({"params": params}, tokens())
  ones = model.apply({"params": params}, tokens(), sublayer_mask=jnp.ones(2 * cfg.num_blocks))
  # Equal up to float reassociation: the select changes how XLA fuses the sums.
  np.testing.assert_allclose(np.asarray(plain), np.asarray(ones), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["keel", "pre_ln", "post_ln"])
@pytest.mark.parametrize("removed", [(), (0,), (1,), (2, 3), (7,)])
def test_masked_sublayer_equals_reference_that_skips_it(scheme, removed):
  cfg = ModelConfig(**{**TINY, "residual": scheme})
  params = random_params(cfg, seed=1)
  keep = np.ones(2 * cfg.num_blocks, np.float32)
  keep[list(removed)] = 0
  got = LM(cfg).apply({"params": params}, tokens(), sublayer_mask=keep)
  want = ref_forward(scheme, cfg, params, tokens(), keep)
  scale = float(jnp.abs(want).max())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-4 * scale, rtol=0)
  if removed:  # the removal changes the output: the reference is not trivially the model
    full = ref_forward(scheme, cfg, params, tokens(), np.ones_like(keep))
    assert float(jnp.abs(full - want).max()) > 1e-2 * scale


def test_mask_follows_blocks_through_nested_remat():
  """Nested remat splits blocks into groups and a tail: each mask entry must reach its block."""
  nested = ModelConfig(**{**TINY, "num_blocks": 6, "nested_remat": True})
  scanned = ModelConfig(**{**TINY, "num_blocks": 6})
  params = random_params(nested, seed=2)  # stored layout is the same for both configs
  for removed in (3, 6, 11):  # in group 0 (2 groups of 2 blocks), group 1, the 1-block tail
    keep = np.ones(12, np.float32)
    keep[removed] = 0
    a = LM(nested).apply({"params": params}, tokens(), sublayer_mask=keep)
    b = LM(scanned).apply({"params": params}, tokens(), sublayer_mask=keep)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- divergence detection

DETECT = dict(window=5, rise_tol=0.5, min_delta=0.02, patience=30)


def test_divergence_none_on_a_falling_curve():
  steps = np.arange(200)
  losses = 5.0 * np.exp(-steps / 60) + 1.0
  found = lr_sweep.divergence(losses, steps * 1e-4, **DETECT)
  assert not found["diverged"] and found["reason"] == ""


def test_divergence_unrecovered_rise_reports_the_lr_at_the_best_step():
  steps = np.arange(200)
  losses = np.where(steps < 120, 5.0 - steps * 0.02, 2.6 + (steps - 120) * 0.05)
  found = lr_sweep.divergence(losses, steps * 1e-4, **DETECT)
  assert found["diverged"] and found["reason"] == "rise"
  assert 115 <= found["index"] <= 121
  assert found["max_lr"] == pytest.approx(found["index"] * 1e-4)


def test_divergence_recovered_spike_is_not_divergence():
  steps = np.arange(200)
  losses = 5.0 - steps * 0.01
  losses[100:110] += 2.0  # a spike the run recovers from
  assert not lr_sweep.divergence(losses, steps * 1e-4, **DETECT)["diverged"]


def test_divergence_nonfinite_and_plateau():
  steps = np.arange(200)
  falling = 5.0 - steps * 0.01
  nan_run = np.concatenate([falling[:150], [np.nan]])
  found = lr_sweep.divergence(nan_run, steps[:151] * 1e-4, **DETECT)
  assert found["reason"] == "nonfinite" and found["index"] >= 145
  flat = np.where(steps < 80, 5.0 - steps * 0.02, 3.4)
  found = lr_sweep.divergence(flat, steps * 1e-4, **DETECT)
  assert found["reason"] == "plateau" and 75 <= found["index"] <= 81


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_configs_build_valid_models_at_every_size(name):
  module = importlib.import_module(f"configs.{name}")
  for size in module.SIZES:
    c = module.get_config(size)
    assert c.size == size and c.schemes
    blocks = c.num_blocks if isinstance(c.num_blocks, int) else max(c.num_blocks)
    for scheme in c.schemes:
      run = experiment.run_config(c, model=dict(residual=scheme, num_blocks=blocks))
      ModelConfig.from_dict({**run.model.to_dict(), "vocab_size": 256})
  with pytest.raises(ValueError, match="unknown size"):
    module.get_config("huge")


# ---------------------------------------------------------------- ci runs of every experiment


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("xla_cache"))


def run_ci(name: str, workdir, xla_cache: str) -> str:
  cmd = [sys.executable, "-m", f"experiments.{name}", f"--config=configs/{name}.py:ci",
         f"--workdir={workdir}", f"--config.compilation_cache={xla_cache}"]  # fmt: skip
  if name == "deep_run":
    cmd = cmd[:-1]  # it always compiles for real: compile time is a result
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
  assert proc.returncode == 0, proc.stderr[-4000:]
  readme = open(os.path.join(workdir, "README.md")).read()
  assert f"experiments.{name} --config=configs/{name}.py:ci" in readme
  data = "arith" if name == "depth_scaling" else "pycode"
  assert f"corpus fingerprint: name={data}" in readme and "## Verdict" in readme
  for png in [f for f in os.listdir(workdir) if f.endswith(".png")] or ["(none)"]:
    assert os.path.getsize(os.path.join(workdir, png)) < 200_000, png
  return str(workdir)


def read_csv(workdir, name):
  with open(os.path.join(workdir, f"{name}.csv")) as f:
    return list(csv.DictReader(f))


def test_depth_scaling_ci(tmp_path, xla_cache):
  d = run_ci("depth_scaling", tmp_path, xla_cache)
  assert os.path.exists(os.path.join(d, "depth_vs_metric.png"))
  runs = read_csv(d, "runs")
  # One LR (ci does not extend its grid), seeds 0 and 1 at it, per scheme and depth.
  assert sorted((r["scheme"], r["sub_layers"], r["seed"]) for r in runs) == sorted(
    (s, n, k) for s in ("keel", "pre_ln") for n in ("2", "6") for k in ("0", "1")
  )
  assert all(r["status"] == "ok" and r["code"] == "source" and r["commit"] for r in runs)
  assert all(0.0 <= float(r["accuracy"]) <= 1.0 for r in runs)
  table = read_csv(d, "table")
  assert [r["sub_layers"] for r in table] == ["2", "6"]
  assert all(r["keel loss"].endswith("(n=2)") and r["keel state"] == "done" for r in table)
  readme = open(os.path.join(d, "README.md")).read()
  assert "Welch" in readme and "NOT bracketed" in readme  # ci's single LR is a grid edge
  assert "Nothing: every cell has finished." in readme
  # Rerun: every cell is reused (nothing retrained), the tables are rewritten identically.
  before = open(os.path.join(d, "runs.csv")).read()
  run_ci("depth_scaling", tmp_path, xla_cache)
  assert open(os.path.join(d, "runs.csv")).read() == before


def test_lr_sweep_ci(tmp_path, xla_cache):
  d = run_ci("lr_sweep", tmp_path, xla_cache)
  assert [r["scheme"] for r in read_csv(d, "table")] == ["keel", "pre_ln"]
  runs = {r["scheme"]: r for r in read_csv(d, "runs")}
  assert set(runs) == {"keel", "pre_ln"}
  assert math.isfinite(float(runs["keel"]["best_loss"])) and int(runs["keel"]["steps_run"]) > 0
  assert all(r["seed"] == "0" and r["code"] == "source" for r in runs.values())
  table = read_csv(d, "table")
  assert all(r["4 why it stopped"] for r in table) and table[0]["paper 64"] == "0.0101"
  sens = read_csv(d, "window_sensitivity")
  assert [r["scheme"] for r in sens] == ["keel", "pre_ln"] and "window 5" in sens[0]


def test_grad_flow_ci(tmp_path, xla_cache):
  d = run_ci("grad_flow", tmp_path, xla_cache)
  rows = read_csv(d, "profiles")
  assert len(rows) == 2 * 2 * 8  # schemes × {init, trained} × sub-layers
  keel = [r for r in rows if r["scheme"] == "keel"]
  assert all(float(r["grad_norm"]) > 0 and float(r["act_rms"]) > 0 for r in keel)
  assert len(read_csv(d, "table")) == 4
  wide = read_csv(d, "table_wide")  # init only, at the wide model's width
  assert [(r["scheme"], r["stage"]) for r in wide] == [("keel", "init"), ("post_ln", "init")]
  flows = {r[f"{k} flow"] for r in wide for k in ("attn", "ffn")}
  assert flows <= {"vanishing", "flat", "growing"}


def test_layer_redundancy_ci(tmp_path, xla_cache):
  d = run_ci("layer_redundancy", tmp_path, xla_cache)
  rows = read_csv(d, "table")
  assert [int(r["sublayer"]) for r in rows] == list(range(6))
  assert all(math.isfinite(float(r["keel Δ loss"])) for r in rows)
  assert {r["scheme"] for r in read_csv(d, "summary")} == {"keel", "pre_ln"}


def test_deep_run_ci(tmp_path):
  d = run_ci("deep_run", tmp_path, "")
  (row,) = read_csv(d, "table")
  assert row["status"] == "ok" and row["sub_layers"] == "128"
  assert math.isfinite(float(row["eval_loss"])) and float(row["compile_s"]) > 0
  assert "Peak resident memory" in open(os.path.join(d, "README.md")).read()
