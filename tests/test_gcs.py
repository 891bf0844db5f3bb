"""gs:// end to end against a GCS JSON API served locally (gcp-storage-emulator, started here).

The smoke config trains with `--workdir=gs://<bucket>/run` on a TFDS dataset (array_record) stored
under `gs://<bucket>/tfds`, streamed through Grain, is stopped by SIGTERM after a checkpoint,
resumes, and must end bitwise equal to an uninterrupted run; then `keel_jax.evaluate` and
`keel_jax.sample` read the same gs:// workdir. Storage faults: the server stops as a checkpoint
starts saving (the run must stop within a minute with one line, and a rerun resume bitwise), and
a server failing one request in seven (the clients must retry). gcsfs (etils.epath), TensorStore
(Orbax's arrays) and array_record (TFDS reads) all talk to the emulator, through the settings in
`gcs_emulator.Emulator.env`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

# find_spec, not import: gcsfs reads its settings (Emulator.env) when imported.
if not all(importlib.util.find_spec(m) for m in ("gcp_storage_emulator", "gcsfs")):
  pytest.skip("needs the test extra: pip install -e .[test]", allow_module_level=True)

import gcs_emulator  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = f"gs://{gcs_emulator.BUCKET}"
DATA = ["--config.data.name=keel_tiny_text", f"--config.data.data_dir={BUCKET}/tfds"]

# The trainer CLI, paused before step KEEL_PAUSE_AT (or before saving step KEEL_PAUSE_SAVE) until
# SIGUSR1: what the test does meanwhile happens at a known point.
HARNESS = r"""
import os, signal, sys, time
from keel_jax import main
from keel_jax.data import streaming
at = int(os.environ.get("KEEL_PAUSE_AT", "-1"))
released = []
signal.signal(signal.SIGUSR1, lambda *_: released.append(1))
train_batch = streaming.StreamingDataset.train_batch
def paused_batch(self, step, *args):
  if step == at:
    print(f"PAUSED at step {step}", flush=True)
    deadline = time.monotonic() + 120
    while not released and time.monotonic() < deadline:
      time.sleep(0.01)
  return train_batch(self, step, *args)
streaming.StreamingDataset.train_batch = paused_batch
from keel_jax import checkpoint
save_at = int(os.environ.get("KEEL_PAUSE_SAVE", "-1"))
save = checkpoint.Checkpointer.save
def paused_save(self, step, *args, **kwargs):
  if step == save_at:
    self.wait()  # the previous step is complete: the outage hits this one
    print(f"SAVING step {step}", flush=True)
    deadline = time.monotonic() + 120
    while not released and time.monotonic() < deadline:
      time.sleep(0.01)
  return save(self, step, *args, **kwargs)
checkpoint.Checkpointer.save = paused_save
from absl import app
app.run(main.main)
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
  root = tmp_path_factory.mktemp("gcs")
  emu = gcs_emulator.Emulator(str(root / "objects")).start()
  old = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)  # this process's gs:// reads (keel_jax.paths) go there too
  try:
    from keel_jax import paths

    local = str(root / "tfds")
    import tiny_tfds  # imports tfds: only once the emulator settings are in the environment

    tiny_tfds.build(local)
    for dirpath, _, files in os.walk(local):
      for name in files:
        rel = os.path.relpath(os.path.join(dirpath, name), local)
        if not rel.startswith("downloads"):
          with open(os.path.join(dirpath, name), "rb") as f:
            paths.write_bytes(f"{BUCKET}/tfds/{rel}", f.read())
    yield emu
  finally:
    emu.stop()
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


@pytest.fixture(scope="module")
def env(emulator, tmp_path_factory):
  e = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "KEEL_PAUSE"))}
  return {
    **e,
    **emulator.env,
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }


def _cli(env, args, *, log, pause_at=None, pause_save=None):
  """Starts `python -c HARNESS args` (or a module, if args[0] is '-m'); output to files."""
  cmd = [sys.executable, *(args if args[0] == "-m" else ["-c", HARNESS, *args])]
  extra = {}
  if pause_at is not None:
    extra["KEEL_PAUSE_AT"] = str(pause_at)
  if pause_save is not None:
    extra["KEEL_PAUSE_SAVE"] = str(pause_save)
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    return subprocess.Popen(cmd, cwd=ROOT, env={**env, **extra}, stdout=out, stderr=err)


def _wait_for(proc, log, marker, timeout=240):
  deadline = time.monotonic() + timeout
  while marker not in _read(log)[0]:
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"no {marker!r}: {_read(log)}")
    time.sleep(0.1)


def _read(log):
  with open(f"{log}.out") as f, open(f"{log}.err") as g:
    return f.read(), g.read()


def _finish(proc, log, timeout=300, code=0):
  try:
    proc.wait(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  out, err = _read(log)
  assert proc.returncode == code, f"exit {proc.returncode}\n{out[-2000:]}\n{err[-3000:]}"
  return out, err


TRAIN = ["--config=configs/smoke.py", *DATA]


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run on a local workdir (same gs:// data): its workdir and final params."""
  d = tmp_path_factory.mktemp("reference")
  _finish(_cli(env, [*TRAIN, f"--workdir={d / 'run'}"], log=d / "log"), d / "log")
  return str(d / "run"), _params(str(d / "run"))


def _params(workdir):
  from keel_jax import restore

  run = restore.load(workdir)
  return run.step, [np.asarray(x) for x in jax.tree.leaves(run.params)]


def _assert_bitwise(a, b):
  assert a[0] == b[0] == 12
  for x, y in zip(a[1], b[1], strict=True):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def test_gs_workdir_trains_resumes_bitwise_evaluates_and_samples(env, reference, tmp_path):
  from keel_jax import metrics, paths

  train, (local, ref_params) = TRAIN, reference
  workdir = f"{BUCKET}/run"
  log = tmp_path / "run1"
  proc = _cli(env, [*train, f"--workdir={workdir}"], pause_at=6, log=log)
  _wait_for(proc, log, "PAUSED at step 6")
  proc.send_signal(signal.SIGTERM)  # lands in step 6: the trainer saves step 7 and stops
  proc.send_signal(signal.SIGUSR1)
  out, _ = _finish(proc, log)
  assert f"SIGTERM: saved checkpoint at step 7 in {workdir}/checkpoints" in out
  assert {"4", "7"} <= set(paths.listdir(f"{workdir}/checkpoints"))

  log = tmp_path / "run2"
  out, _ = _finish(_cli(env, [*train, f"--workdir={workdir}"], log=log), log)
  assert "resumed from the checkpoint at step 7" in out
  assert paths.read_json(f"{workdir}/data_fingerprint.json")["pipeline"] == "grain-stream"

  _assert_bitwise(_params(workdir), ref_params)
  # Everything else the trainer writes landed in the bucket, nothing on local disk.
  rows = metrics.read(workdir)
  assert [r["step"] for r in rows if "train/loss" in r][-1] == 12
  ref_rows = metrics.read(local)
  # Logged losses are window means: the first window after the resume (step 8) is shorter.
  loss = lambda rs: {r["step"]: r["train/loss"] for r in rs if "train/loss" in r and r["step"] != 8}
  assert loss(rows) == loss(ref_rows)
  names = set(paths.listdir(workdir))
  assert {"config.json", "data_fingerprint.json", "metrics.jsonl", "loss.png"} <= names
  events = paths.listdir(f"{workdir}/tensorboard")
  assert events and paths.read_bytes(f"{workdir}/tensorboard/{events[0]}")
  assert not os.path.exists(os.path.join(ROOT, "gs:")), (
    "a gs:// path was written as a local directory"
  )

  log = tmp_path / "eval"
  out, _ = _finish(_cli(env, ["-m", "keel_jax.evaluate", f"--workdir={workdir}"], log=log), log)
  report = paths.read_json(f"{workdir}/eval_step_12.json")
  assert report["step"] == 12 and np.isfinite(report["eval/loss"])
  assert re.search(r"eval/loss\s+\d", out)

  log = tmp_path / "sample"
  args = ["-m", "keel_jax.sample", f"--workdir={workdir}", "--max_new_tokens=8", "--prompt=def "]
  out, _ = _finish(_cli(env, args, log=log), log)
  assert "--- prompt 'def ' (step 12)" in out


def test_storage_outage_mid_save_stops_within_a_minute_then_resumes_bitwise(
  emulator, env, reference, tmp_path
):
  workdir = f"{BUCKET}/outage"
  log = tmp_path / "outage"
  proc = _cli(env, [*TRAIN, f"--workdir={workdir}"], pause_save=8, log=log)
  _wait_for(proc, log, "SAVING step 8")
  emulator.stop()  # the bucket goes away as step 8 starts saving
  try:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    _, err = _finish(proc, log, timeout=180, code=2)
    seconds = time.monotonic() - t0
  finally:
    emulator.start()
  print(f"stopped {seconds:.0f} s after the outage began; last line: {err.splitlines()[-1]}")
  assert seconds < 60
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ") and workdir in last, err[-3000:]
  assert "Traceback" not in err, err[-3000:]

  log = tmp_path / "rerun"
  out, _ = _finish(_cli(env, [*TRAIN, f"--workdir={workdir}"], log=log), log)
  assert "resumed from the checkpoint at step 4" in out
  _assert_bitwise(_params(workdir), reference[1])


def test_transient_storage_errors_are_retried(emulator, env, reference, tmp_path):
  emulator.stop()
  emulator.start(fail_every=7)  # one request in seven answered 503
  try:
    workdir = f"{BUCKET}/flaky"
    log = tmp_path / "flaky"
    _finish(_cli(env, [*TRAIN, f"--workdir={workdir}"], log=log), log)
  finally:
    emulator.stop()
    emulator.start()
  _assert_bitwise(_params(workdir), reference[1])
