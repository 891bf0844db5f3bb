"""Multi-host on one machine: the CLI as 2 processes × 4 fake CPU devices (gloo collectives,
jax.distributed on localhost) against 1 process × 8 devices on the same (2,2,2) mesh.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from test_faults import HARNESS  # the CLI with a fault injected at a step

from keel_jax import metrics, restore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = ["--config.mesh.shape=(2,2,2)", "--config.model.num_kv_heads=2"]  # kv heads split 2 ways
# Process counts differ in how collectives add up floats (gloo vs in-process): allow rounding.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(env, workdir, *args, devices: int, tag: str, fault=None) -> subprocess.Popen:
  """The CLI with `devices` fake CPU devices; output goes to <workdir>.<tag>.log.

  With `fault`, runs it under test_faults.HARNESS (e.g. {"kind": "pause", "step": 5}).
  """
  cli = ["-c", HARNESS] if fault else ["-m", "keel_jax.main"]
  cmd = [sys.executable, *cli, "--config=configs/smoke.py", f"--workdir={workdir}", *MESH, *args]
  extra = {
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    "KEEL_FAULT": json.dumps(fault or {}),
  }
  with open(f"{workdir}.{tag}.log", "w") as log:
    return subprocess.Popen(
      cmd, cwd=ROOT, env={**env, **extra}, stdout=log, stderr=subprocess.STDOUT
    )


def log_of(workdir, tag) -> str:
  with open(f"{workdir}.{tag}.log") as f:
    return f.read()


def finish(procs, workdir, timeout=300) -> None:
  """Waits for every process; if one fails or hangs, kills the rest (they would wait forever)."""
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs if p.returncode not in (None, 0)]
      assert not failed and time.monotonic() < deadline, "a process failed or hung"
      time.sleep(0.1)
  except AssertionError:
    for p in procs:
      if p.poll() is None:
        p.kill()
    raise
  finally:
    codes = [p.wait() for p in procs]
    tails = [log_of(workdir, f"p{i}")[-2000:] for i in range(len(procs))]
  assert codes == [0] * len(procs), (codes, tails)


def run_two(env, workdir, *args, fault=None) -> list[subprocess.Popen]:
  port = free_port()
  procs = [
    launch(
      env,
      workdir,
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      f"--process_id={i}",
      *args,
      devices=4,
      tag=f"p{i}",
      fault=fault,
    )
    for i in range(2)
  ]
  return procs


def run_one(env, workdir, *args) -> None:
  finish([launch(env, workdir, *args, devices=8, tag="p0")], workdir)


def params(workdir):
  run = restore.load(str(workdir))
  return run.step, [np.asarray(x) for x in jax.tree.leaves(run.params)]


def curve(workdir, key="train/loss") -> list[tuple[int, float]]:
  return [(r["step"], r[key]) for r in metrics.read(str(workdir)) if key in r]


def assert_close(a, b):
  assert len(a) == len(b)
  print("max |param diff|:", max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)))
  for x, y in zip(a, b, strict=True):
    np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


@pytest.fixture(scope="module")
def single(env, tmp_path_factory):
  """1 process, 8 devices, uninterrupted."""
  workdir = tmp_path_factory.mktemp("multihost") / "single"
  run_one(env, workdir)
  return workdir


@pytest.fixture(scope="module")
def two(env, tmp_path_factory):
  """2 processes × 4 devices, uninterrupted."""
  workdir = tmp_path_factory.mktemp("multihost") / "two"
  finish(run_two(env, workdir), workdir)
  return workdir


def test_two_processes_match_one_process(single, two):
  for key in ("train/loss", "eval/loss"):
    a, b = curve(two, key), curve(single, key)
    assert [s for s, _ in a] == [s for s, _ in b] and a, key
    np.testing.assert_allclose([v for _, v in a], [v for _, v in b], rtol=1e-6)
  (step_a, a), (step_b, b) = params(two), params(single)
  assert step_a == step_b == 12
  assert_close(a, b)
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in log_of(two, "p0")
  assert "steps 0→12" not in log_of(two, "p1")  # only process 0 prints and writes metrics


def test_two_process_checkpoint_resumes_in_one_process(env, single, two, tmp_path):
  workdir = tmp_path / "resumed"
  shutil.copytree(two, workdir)
  shutil.rmtree(workdir / "checkpoints" / "12")  # as if stopped after step 8
  os.remove(workdir / "metrics.jsonl")
  run_one(env, workdir)
  assert "steps 8→12" in log_of(workdir, "p0")
  a, b = dict(curve(workdir)), dict(curve(single))
  assert sorted(a) == [10, 12]
  np.testing.assert_allclose([a[s] for s in a], [b[s] for s in a], rtol=1e-6)
  (step_a, a), (step_b, b) = params(workdir), params(single)
  assert step_a == step_b == 12
  assert_close(a, b)


def test_sigterm_at_different_steps_saves_one_step_on_both_hosts(env, single, tmp_path):
  """Preemption reaches hosts at different moments; a save is collective, so all must agree."""
  workdir = tmp_path / "preempted"
  procs = run_two(env, workdir, fault={"kind": "pause", "step": 5})
  deadline = time.monotonic() + 300
  try:
    while not all("FAULT paused at step 5" in log_of(workdir, f"p{i}") for i in range(2)):
      assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
      time.sleep(0.1)
  except AssertionError:
    for p in procs:
      p.kill()
    raise
  procs[0].send_signal(signal.SIGTERM)
  procs[0].send_signal(signal.SIGUSR1)
  time.sleep(1.0)  # host 0 goes on (and waits for host 1) before host 1's own notice arrives
  procs[1].send_signal(signal.SIGTERM)
  procs[1].send_signal(signal.SIGUSR1)
  finish(procs, workdir, timeout=120)  # before the fix: a deadlock, one host saving alone
  # Both flags are set before either host's step 6 poll, which gathers them: both stop at 6.
  m = re.search(r"SIGTERM: saved checkpoint at step (\d+)", log_of(workdir, "p0"))
  assert m and int(m.group(1)) == 6, log_of(workdir, "p0")[-3000:]
  step = int(m.group(1))
  print("2 hosts saved step", step, "on SIGTERM")
  on_schedule = [str(s) for s in (4, 8) if s <= step]
  assert sorted(os.listdir(workdir / "checkpoints")) == sorted({*on_schedule, str(step)})
  os.remove(workdir / "metrics.jsonl")
  run_one(env, workdir)  # and the 2-host checkpoint resumes on 1 host
  assert f"steps {step}→12" in log_of(workdir, "p0")
  (step_a, a), (step_b, b) = params(workdir), params(single)
  assert step_a == step_b == 12
  assert_close(a, b)
