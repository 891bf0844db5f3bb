"""Fault injection on the smoke config: SIGKILL, SIGTERM, damaged checkpoints, unwritable or full
checkpoint storage, malformed data. Every trainer run is a subprocess of the real CLI.

Faults fire at chosen steps from inside the trainer process (HARNESS hooks the batch loader and
Checkpointer.save), so each run is reproducible; kill points come from a seeded RNG
(KEEL_FAULT_SEED) and are printed. A shared persistent compilation cache keeps restarts cheap.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from storage_faults import read_only

from configs import smoke
from keel_jax import data, metrics, restore, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = int(os.environ.get("KEEL_FAULT_SEED", "20250611"))
CKPT_STEPS = [4, 8, 12]  # smoke: checkpoint_every=4, num_steps=12, keep_checkpoints=3

# The CLI with one fault (KEEL_FAULT, JSON) injected at a step. With KEEL_DOCS, the TFDS
# dataset config.data.name reads those documents instead (bytes as latin-1 strings).
HARNESS = r"""
import json, os, signal, sys, time
fault = json.loads(os.environ.get("KEEL_FAULT") or "{}")
kind, at = fault.get("kind"), fault.get("step")
released = []
signal.signal(signal.SIGUSR1, lambda *_: released.append(1))

def say(msg):
  print(f"FAULT {msg}", flush=True)

from keel_jax import checkpoint, data, main

train_batch = data.Dataset.train_batch
def hooked_batch(self, step, *args):
  if step == at and kind == "kill":
    say(f"SIGKILL at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)
  if step == at and kind == "pause":
    say(f"paused at step {step}")
    deadline = time.monotonic() + 120
    while not released:
      if time.monotonic() > deadline:
        say("never released")
        os._exit(97)
      time.sleep(0.01)
  return train_batch(self, step, *args)
data.Dataset.train_batch = hooked_batch

save = checkpoint.Checkpointer.save
def hooked_save(self, step, state, **kw):
  save(self, step, state, **kw)
  if step == at and kind == "kill_in_save":
    say(f"SIGKILL in save of step {step}: {sorted(os.listdir(self.directory))}")
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = hooked_save

from absl import app
docs = os.environ.get("KEEL_DOCS")
if docs is None:
  app.run(main.main)
else:
  import tensorflow_datasets as tfds
  records = [{"text": d.encode("latin-1")} for d in json.loads(docs)]
  def as_data_source(self, split, **kw):
    return [records for _ in split] if isinstance(split, (list, tuple)) else records
  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    app.run(main.main)
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Subprocess environment: CPU only, one device, a compilation cache shared by all runs."""
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  e = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "KEEL_FAULT", "KEEL_DOCS")}
  return {
    **e,
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": cache,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
  }


class Run:
  """One trainer subprocess; stdout and stderr go to files (a full pipe would stall it)."""

  def __init__(self, env, workdir, *overrides, fault=None, docs=None):
    self.workdir = str(workdir)
    log = f"{self.workdir}.{time.monotonic_ns()}"
    self._out, self._err = f"{log}.out", f"{log}.err"
    cmd = [sys.executable, "-c", HARNESS, "--config=configs/smoke.py", f"--workdir={workdir}"]
    extra = {"KEEL_FAULT": json.dumps(fault or {})}
    if docs is not None:
      extra["KEEL_DOCS"] = json.dumps([d.decode("latin-1") for d in docs])
    with open(self._out, "w") as out, open(self._err, "w") as err:
      self.proc = subprocess.Popen(
        [*cmd, *overrides], cwd=ROOT, env={**env, **extra}, stdout=out, stderr=err
      )

  @property
  def stdout(self) -> str:
    with open(self._out) as f:
      return f.read()

  @property
  def stderr(self) -> str:
    with open(self._err) as f:
      return f.read()

  def wait_for(self, marker: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    with self.killed_on_error():
      while marker not in self.stdout:
        assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"no {marker!r} after {timeout} s"
        time.sleep(0.05)

  @contextlib.contextmanager
  def killed_on_error(self):
    """A failing test must not leave a paused trainer behind."""
    try:
      yield
    except BaseException:
      self.proc.kill()
      raise

  def finish(self, timeout: float = 300) -> int:
    try:
      return self.proc.wait(timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise

  def start_step(self) -> int:
    """The step this run started from (0: fresh), from its banner line."""
    m = re.search(r"steps (\d+)→", self.stdout)
    assert m, self.stdout[-2000:] + self.stderr[-2000:]
    return int(m.group(1))


def run(env, workdir, *overrides, **kw) -> Run:
  r = Run(env, workdir, *overrides, **kw)
  r.finish()
  return r


def params(workdir, step=None):
  run_ = restore.load(str(workdir), step)
  return run_.step, [np.asarray(x) for x in jax.tree.leaves(run_.params)]


def assert_bitwise(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def losses(workdir) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in metrics.read(str(workdir)) if "train/loss" in r}


def ckpt_dir(workdir) -> str:
  return os.path.join(str(workdir), "checkpoints")


def wait_committed(workdir, step: int, timeout: float = 120) -> None:
  """Until checkpoint `step` is renamed into place and no save is in flight."""
  d, deadline = ckpt_dir(workdir), time.monotonic() + timeout
  while not (str(step) in os.listdir(d) and not glob.glob(os.path.join(d, "*tmp*"))):
    assert time.monotonic() < deadline, os.listdir(d)
    time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """The uninterrupted smoke run: its workdir, final params and logged losses."""
  workdir = tmp_path_factory.mktemp("faults") / "reference"
  r = run(env, workdir)
  assert r.proc.returncode == 0, r.stderr[-3000:]
  step, final = params(workdir)
  assert step == 12 and sorted(map(int, os.listdir(ckpt_dir(workdir)))) == CKPT_STEPS
  return workdir, final, losses(workdir)


def fresh_copy(reference, tmp_path, name="run"):
  workdir = tmp_path / name
  shutil.copytree(reference[0], workdir)
  return workdir


# ------------------------------------------------------------------ SIGKILL and SIGTERM


def committed_step(workdir) -> int:
  """The newest checkpoint renamed into place (what a restart resumes from), or 0."""
  d = ckpt_dir(workdir)
  return max((int(n) for n in os.listdir(d) if n.isdigit()), default=0) if os.path.isdir(d) else 0


def test_sigkill_at_random_steps_and_mid_save_resumes_bitwise(env, reference, tmp_path):
  _, final, ref_losses = reference
  rng = random.Random(SEED)
  workdir = tmp_path / "killed"
  plan = []
  for kind in ("kill", "kill_in_save", "kill"):
    start = committed_step(workdir)
    if kind == "kill":  # SIGKILL as step `at` is loaded: saves up to `at` may be in flight
      at = rng.randint(start + 1, 11)
    else:  # SIGKILL right after save() returns: the temporary directory is still being written
      at = rng.choice([c for c in CKPT_STEPS if c > start])
    plan.append((kind, at))
    print(f"KEEL_FAULT_SEED={SEED}: run from step {start}, {kind} at step {at}")
    r = run(env, workdir, fault={"kind": kind, "step": at})
    assert r.proc.returncode == -signal.SIGKILL, (plan, r.stderr[-3000:])
    assert r.start_step() == start, plan
    if kind == "kill_in_save":
      listing = r.stdout.split(f"SIGKILL in save of step {at}: ")[1].splitlines()[0]
      assert f"'{at}.orbax-checkpoint-tmp" in listing and f"'{at}'" not in listing, listing
      assert committed_step(workdir) == at - 4, plan  # the half-written step is not resumed
  start = committed_step(workdir)
  r = run(env, workdir)
  assert r.proc.returncode == 0, r.stderr[-3000:]
  assert r.start_step() == start
  assert sorted(os.listdir(ckpt_dir(workdir))) == sorted(map(str, CKPT_STEPS))  # tmp dirs gone
  assert_bitwise(params(workdir)[1], final)
  # Every logged loss, from killed and resumed runs alike, equals the uninterrupted run's.
  rows = [r for r in metrics.read(str(workdir)) if "train/loss" in r]
  assert rows and all(row["train/loss"] == ref_losses[row["step"]] for row in rows)


def test_sigterm_checkpoints_exits_cleanly_and_resumes_bitwise(env, reference, tmp_path):
  at = random.Random(SEED + 1).choice([k for k in range(1, 11) if (k + 1) % 4])
  print(f"KEEL_FAULT_SEED={SEED}: SIGTERM at step {at}")
  workdir = tmp_path / "preempted"
  r = Run(env, workdir, fault={"kind": "pause", "step": at})
  r.wait_for(f"FAULT paused at step {at}")
  r.proc.send_signal(signal.SIGTERM)
  r.proc.send_signal(signal.SIGUSR1)
  assert r.finish() == 0, r.stderr[-3000:]
  # The step in flight completes and is saved off the checkpoint_every schedule.
  assert f"SIGTERM: saved checkpoint at step {at + 1}" in r.stdout
  assert committed_step(workdir) == at + 1
  r = run(env, workdir)
  assert r.proc.returncode == 0 and r.start_step() == at + 1, r.stderr[-3000:]
  assert_bitwise(params(workdir)[1], reference[1])


# ------------------------------------------------------------------ damaged checkpoints


def largest_data_file(step_dir) -> str:
  files = glob.glob(os.path.join(step_dir, "default", "ocdbt.process_*", "d", "*"))
  return max(files, key=os.path.getsize)


def truncate_data(step_dir):
  path = largest_data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def flip_data_bytes(step_dir):
  """Silent corruption: same size, 64 bytes inverted in the middle of the array data."""
  path = largest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def garble_metadata(step_dir):
  with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
    f.write('{"tree_metadata": ')


@pytest.mark.parametrize("damage", [truncate_data, flip_data_bytes, garble_metadata])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(env, reference, tmp_path, damage):
  workdir = fresh_copy(reference, tmp_path)
  damage(os.path.join(ckpt_dir(workdir), "12"))
  r = run(env, workdir)
  assert r.proc.returncode == 0, r.stderr[-3000:]
  print(*[line for line in r.stderr.splitlines() if "unreadable" in line], sep="\n")
  assert r.start_step() == 8
  assert re.search(r"checkpoint step 12 in \S+ is unreadable \(.+\); trying the previous", r.stderr)
  assert "moved checkpoint step 12 aside" in r.stderr
  assert sorted(os.listdir(ckpt_dir(workdir))) == ["12", "12.corrupt", "4", "8"]
  assert_bitwise(params(workdir)[1], reference[1])


def error_line(r: Run) -> str:
  """The CLI's one-line error. Orbax's threads may log tracebacks of abandoned reads and writes
  around it; none may pass through the CLI (an uncaught exception)."""
  assert 'keel_jax/main.py", line' not in r.stderr, r.stderr[-3000:]
  lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, r.stderr[-3000:]
  return lines[0]


def test_no_readable_checkpoint_stops_instead_of_starting_over(env, reference, tmp_path):
  workdir = fresh_copy(reference, tmp_path)
  for step in CKPT_STEPS:
    truncate_data(os.path.join(ckpt_dir(workdir), str(step)))
  with open(os.path.join(workdir, "config.json")) as f:
    config_json = f.read()
  r = run(env, workdir, "--config.train.log_every=3")
  assert r.proc.returncode == 2, r.stderr[-3000:]
  line = error_line(r)
  print(line)
  assert line.startswith("error: no readable checkpoint in") and "[12, 8, 4]" in line, line
  assert "steps 0→" not in r.stdout
  assert sorted(os.listdir(ckpt_dir(workdir))) == sorted(map(str, CKPT_STEPS))
  with open(os.path.join(workdir, "config.json")) as f:  # the failed attempt's config is not kept
    assert f.read() == config_json


# ------------------------------------------------------------------ unwritable storage


@contextlib.contextmanager
def tiny_tmpfs(path):
  """A 32 MiB tmpfs at `path`; skips where mounting is not allowed (needs CAP_SYS_ADMIN)."""
  os.makedirs(path)
  cmd = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", path]
  if not shutil.which("mount") or subprocess.run(cmd, capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): no disk to fill")
  try:
    yield
  finally:
    subprocess.run(["umount", "-l", path], check=True)


def fill(directory) -> None:
  with open(os.path.join(directory, "filler"), "wb") as f:
    with contextlib.suppress(OSError):
      while True:
        f.write(b"\0" * (1 << 20))
        f.flush()


def storage_fault(env, workdir, act) -> Run:
  """Trains until checkpoint 4 is on disk, calls act(checkpoint dir), then lets it go on."""
  r = Run(env, workdir, fault={"kind": "pause", "step": 6})
  r.wait_for("FAULT paused at step 6")
  with r.killed_on_error():
    wait_committed(workdir, 4)
    act(ckpt_dir(workdir))
  released = time.monotonic()
  r.proc.send_signal(signal.SIGUSR1)
  r.finish()
  r.exit_seconds = time.monotonic() - released
  return r


def assert_failed_cleanly_keeping_step_4(r, reference, workdir, reason):
  assert r.proc.returncode == 2, r.stderr[-3000:]
  line = error_line(r)
  print(f"{line} (exit {r.proc.returncode} {r.exit_seconds:.1f} s after the fault)")
  assert re.match(rf"error: saving checkpoint step 8 to \S+ failed: .*{reason}", line), line
  assert r.exit_seconds < 60  # no thread left waiting on the failed save (Orbax's waits 300 s)
  steps = [n for n in os.listdir(ckpt_dir(workdir)) if n != "filler"]
  assert steps == ["4"], steps  # the partial step 8 is gone, step 4 untouched
  step, got = params(workdir, 4)
  assert step == 4
  assert_bitwise(got, params(reference[0], 4)[1])


def test_read_only_checkpoint_dir_mid_run_fails_clearly(env, reference, tmp_path):
  workdir = tmp_path / "read_only"
  stack = contextlib.ExitStack()
  with stack:
    r = storage_fault(env, workdir, lambda d: stack.enter_context(read_only(d)))
  assert_failed_cleanly_keeping_step_4(r, reference, workdir, "(Permission denied|not permitted)")


def test_full_disk_mid_run_fails_clearly(env, reference, tmp_path):
  workdir = tmp_path / "full"
  with tiny_tmpfs(ckpt_dir(workdir)):
    r = storage_fault(env, workdir, fill)
    assert_failed_cleanly_keeping_step_4(r, reference, workdir, "No space left on device")


# ------------------------------------------------------------------ malformed data

# Empty documents, invalid UTF-8 (a stray continuation byte, a truncated sequence, an encoded
# surrogate), control bytes; ~90 tokens in all: 2 sequences of 32, fewer than batch_size=8.
MALFORMED = [
  b"",
  b"\xff\xfe bad start \xc3\x28 truncated \xed\xa0\x80 surrogate",
  b"",
  b"def f(x):\n  return x\n",
  b"\x00\x01\x02 control",
  b"",
]


def mock_tfds(docs):
  import tensorflow_datasets as tfds

  records = [{"text": d} for d in docs]
  return tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: [records] * len(split))


def test_malformed_documents_are_cleaned_or_dropped(tmp_path):
  cfg = smoke.get_config().data
  cfg.update(name="tiny_shakespeare", cache_dir=str(tmp_path), pipeline="cache")
  with mock_tfds(MALFORMED):
    ds = data.make(cfg)
  assert ds.fingerprint["num_train_docs"] == 3  # the empty ones are dropped
  # Invalid bytes become U+FFFD (Python's "replace"); each kept document ends with one EOS.
  cleaned = [d.decode("utf-8", "replace").encode() for d in MALFORMED if d]
  assert sum(d.count("\ufffd".encode()) for d in cleaned) == 6
  want = [t for d in cleaned for t in [*(b + 3 for b in d), ds.tokenizer.eos_id]]
  assert np.asarray(ds._train).tolist() == want


def test_data_with_no_whole_sequence_is_a_one_line_error(tmp_path):
  cfg = smoke.get_config()
  cfg.data.update(name="tiny_shakespeare", cache_dir=str(tmp_path / "cache"))
  workdir = tmp_path / "never"
  with mock_tfds([b"", b"short", b""]), pytest.raises(ValueError) as e:
    train.train(cfg, str(workdir))
  assert "less than one sequence" in str(e.value) and "\n" not in str(e.value)
  assert not workdir.exists()


def test_trains_on_malformed_data_smaller_than_one_batch(env, reference, tmp_path):
  del reference  # only for its warm compilation cache
  workdir = tmp_path / "malformed"
  cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
  r = run(env, workdir, "--config.data.name=tiny_shakespeare", cache, docs=MALFORMED)
  assert r.proc.returncode == 0, r.stderr[-3000:]
  m = re.search(r"train split has (\d+) sequences .*batch_size=8", r.stderr)
  print(m and m.group(0))
  assert m and int(m.group(1)) < 8, r.stderr[-3000:]
  rows = [row for row in metrics.read(str(workdir)) if "train/loss" in row]
  assert rows[-1]["step"] == 12 and all(np.isfinite(row["train/loss"]) for row in rows)
  assert sorted(os.listdir(ckpt_dir(workdir))) == sorted(map(str, CKPT_STEPS))
