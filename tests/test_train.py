"""Trainer: learning, exact resume, sharding, preemption, NaN guard, config errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import smoke
from keel_jax import metrics, restore, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def final_params(workdir):
  """The newest checkpoint's step and params (as numpy), restored onto this process's devices."""
  run = restore.load(str(workdir))
  return run.step, jax.tree.map(np.asarray, run.params)


def run_cli(workdir, *overrides, env=None, check=True):
  cmd = [
    sys.executable,
    "-m",
    "keel_jax.main",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    *overrides,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  result = train.train(smoke.get_config(), workdir)
  return workdir, result


def test_learns_and_writes_everything(smoke_run):
  workdir, result = smoke_run
  rows = metrics.read(workdir)
  train_rows = [r for r in rows if "train/loss" in r]
  assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"] - 0.3
  for key in (
    "train/loss",
    "train/grad_norm",
    "train/learning_rate",
    "train/tokens_per_sec",
    "train/mfu",
  ):
    assert np.isfinite(train_rows[-1][key]), key
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in eval_rows] == [6, 12]
  assert {"eval/perplexity", "eval/bits_per_byte"} <= set(eval_rows[-1])
  diag = [r for r in rows if "diag/grad_norm_per_sublayer" in r]
  assert diag and len(diag[0]["diag/grad_norm_per_sublayer"]) == 4  # 2 blocks = 4 sub-layers
  assert rows[0]["info/data_fingerprint"]
  for name in ("config.json", "loss.png", "data_fingerprint.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert result["eval/loss"] == eval_rows[-1]["eval/loss"]


def test_resume_is_bitwise_exact(smoke_run, tmp_path):
  workdir, _ = smoke_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  ckpts = os.path.join(resumed, "checkpoints")
  for step in ("12", "8"):  # as if killed after the step-4 checkpoint
    shutil.rmtree(os.path.join(ckpts, step))
  train.train(smoke.get_config(), resumed)
  (step_a, a), (step_b, b) = final_params(workdir), final_params(resumed)
  assert step_a == step_b == 12
  chex.assert_trees_all_equal(a, b, strict=True)


def test_grad_accumulation_matches_one_batch(tmp_path):
  cfg = smoke.get_config()
  cfg.train.update(num_steps=2, checkpoint_every=0, eval_every=0)
  train.train(cfg, str(tmp_path / "one"))
  cfg.train.grad_accum_steps = 4
  train.train(cfg, str(tmp_path / "accum"))
  (_, a), (_, b) = final_params(tmp_path / "one"), final_params(tmp_path / "accum")
  chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)


SHARDED = """
import sys
sys.path.insert(0, {root!r})
import chex
chex.set_n_cpu_devices({devices})  # fake CPU devices: before jax initializes its backends
from configs import smoke
from keel_jax import train
cfg = smoke.get_config()
cfg.model.num_kv_heads = 2  # so kv heads split over tensor=2
cfg.train.num_steps = {steps}
cfg.mesh.shape = {shape}
train.train(cfg, {workdir!r})
"""


def run_sharded(workdir, shape, steps, devices=8):
  code = SHARDED.format(root=ROOT, steps=steps, shape=shape, workdir=str(workdir), devices=devices)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [(r["step"], r["train/loss"]) for r in metrics.read(workdir) if "train/loss" in r]


def test_sharded_matches_single_device_and_restores_across_meshes(tmp_path):
  single = run_sharded(tmp_path / "single", (1, 1, 1), 8, devices=1)
  sharded = run_sharded(tmp_path / "sharded", (2, 2, 2), 8)
  assert [s for s, _ in single] == [s for s, _ in sharded]
  np.testing.assert_allclose([v for _, v in sharded], [v for _, v in single], rtol=1e-4)

  # The (2,2,2) checkpoint at step 8 continues on (4,1,2) and on 1 device alike.
  reference = run_sharded(tmp_path / "sharded", (2, 2, 2), 12)
  for name, shape, devices in (("mesh412", (4, 1, 2), 8), ("one", (1, 1, 1), 1)):
    shutil.copytree(tmp_path / "sharded", tmp_path / name)
    shutil.rmtree(tmp_path / name / "checkpoints" / "12")
    os.remove(tmp_path / name / "metrics.jsonl")
    losses = run_sharded(tmp_path / name, shape, 12, devices=devices)
    np.testing.assert_allclose(
      [v for _, v in losses], [v for s, v in reference if s > 8], rtol=1e-4
    )
    (_, a), (_, b) = final_params(tmp_path / name), final_params(tmp_path / "sharded")
    chex.assert_trees_all_close(a, b, rtol=1e-3, atol=1e-5)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = tmp_path / "preempted"
  cmd = [
    sys.executable,
    "-m",
    "keel_jax.main",
    "--config=configs/smoke.py",
    f"--workdir={workdir}",
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every=0",
    "--config.train.eval_every=0",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not any("train/loss" in r for r in metrics.read(workdir)):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM: saved checkpoint" in out
  step, params = final_params(workdir)
  assert 0 < step < 100000
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nonfinite_stops_with_last_good_checkpoint(tmp_path):
  cfg = smoke.get_config()
  # An absurd LR without clipping blows the parameters up after the first checkpoint.
  cfg.train.update(
    learning_rate=1e12,
    grad_clip=0.0,
    warmup_steps=0,
    schedule="constant",
    checkpoint_every=1,
    num_steps=50,
  )
  with pytest.raises(train.NonFiniteError, match=r"non-finite loss or gradient at step \d+"):
    train.train(cfg, str(tmp_path / "stop"))
  step, params = final_params(tmp_path / "stop")
  assert step >= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))

  cfg.train.update(nonfinite="skip", checkpoint_every=0, num_steps=12)
  result = train.train(cfg, str(tmp_path / "skip"))
  assert result["train/skipped_steps"] > 0


@pytest.mark.parametrize(
  "override, message",
  [
    ({"model.residual": "resnet"}, "config.model.residual"),
    ({"train.schedule": "triangle"}, "schedule"),
    ({"model.num_heads": 3}, "num_heads"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4}, "num_kv_heads"),
    ({"mesh.shape": (2, 1, 1)}, "config.mesh.shape"),
    ({"train.batch_size": 7, "train.grad_accum_steps": 2}, "batch_size"),
    ({"data.name": "no_such_dataset_xyz"}, "no_such_dataset_xyz"),
    ({"train.nonfinite": "ignore"}, "nonfinite"),
  ],
)
def test_invalid_config_rejected_before_writing(tmp_path, override, message):
  cfg = smoke.get_config()
  for key, value in override.items():
    section, field = key.split(".")
    cfg[section][field] = value
  workdir = tmp_path / "never"
  with pytest.raises(ValueError, match=message):
    train.train(cfg, str(workdir))
  assert not workdir.exists()


def test_unwritable_workdir_and_cli_error_is_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  proc = run_cli(blocker / "run", check=False)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: workdir")
  assert "Traceback" not in proc.stderr


def test_config_json_round_trips(smoke_run):
  workdir, _ = smoke_run
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["model"]["residual"] == "keel"
  assert saved["train"]["num_steps"] == 12


@pytest.fixture(scope="module")
def five_block_run(tmp_path_factory):
  """Smoke run with 5 blocks, so that nested remat really splits Keel's 4-block segment."""
  cfg = smoke.get_config()
  cfg.model.num_blocks = 5
  cfg.train.update(eval_every=0, diag_every=0)
  workdir = str(tmp_path_factory.mktemp("five"))
  train.train(cfg, workdir)
  return cfg, workdir


@pytest.mark.parametrize("settings", [{"nested_remat": True}, {"scan_layers": False}])
def test_resume_with_other_memory_settings(five_block_run, tmp_path, settings):
  """One checkpoint layout: a run resumes under nested remat or unrolled blocks, and its next
  losses and final parameters equal the unchanged run's to float rounding."""
  cfg, workdir = five_block_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  for step in ("12", "8"):
    shutil.rmtree(os.path.join(resumed, "checkpoints", step))
  cfg = cfg.copy_and_resolve_references()
  cfg.model.update(settings)
  train.train(cfg, resumed)
  losses = lambda w: {r["step"]: r["train/loss"] for r in metrics.read(w) if "train/loss" in r}
  want, got = losses(workdir), losses(resumed)
  later = [s for s in want if s > 4]
  assert later and all(s in got for s in later)
  np.testing.assert_allclose([got[s] for s in later], [want[s] for s in later], rtol=1e-5)
  (_, a), (_, b) = final_params(workdir), final_params(resumed)
  chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)


def test_resume_with_another_model_names_the_fields(five_block_run, tmp_path):
  cfg, workdir = five_block_run
  other = str(tmp_path / "other")
  shutil.copytree(workdir, other)
  before = open(os.path.join(other, "config.json")).read()
  cfg = cfg.copy_and_resolve_references()
  cfg.model.update(d_model=64, residual="pre_ln")
  cfg.train.mu_dtype = "bfloat16"  # the stored moments' dtype: not a silent cast
  with pytest.raises(
    ValueError, match=r"model.d_model: 32 → 64; model.residual: 'keel'.*train.mu_dtype: '' →"
  ):
    train.train(cfg, other)
  assert open(os.path.join(other, "config.json")).read() == before
  assert sorted(os.listdir(os.path.join(other, "checkpoints"))) == ["12", "4", "8"]
