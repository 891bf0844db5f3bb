"""Which code produced a result: git commit, a hash of keel_jax/ and a behavioural fingerprint.

The source hash changes with any edit (a renamed path, a new benchmark option); the behavioural
fingerprint changes only when the numbers do: it trains a tiny model of one residual scheme for
a few steps on the real data pipeline, optimizer and loss, and keeps the losses and parameter
norm. A finished run is reused when its config matches and either of the two matches the
current code (`same_code`); tables mark the rows whose source differs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import subprocess

import jax
import optax

import keel_jax
from configs import default
from keel_jax import builders, paths, steps, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.dirname(os.path.abspath(keel_jax.__file__))  # the copy that is imported
FINGERPRINT_STEPS = 4
# Relative tolerance on fingerprint values: absorbs a reordered float sum after a refactor,
# far below what any change of model, init, optimizer or data does after a few steps.
FINGERPRINT_RTOL = 1e-4


@functools.cache
def git_commit() -> str:
  """HEAD of the checkout that holds keel_jax/, '+dirty' if keel_jax/ has uncommitted edits;
  read once per process, like the sources it imported."""
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=PACKAGE, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--", "."], cwd=PACKAGE, capture_output=True, text=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


@functools.cache
def source_hash() -> str:
  """sha256 (16 hex digits) over keel_jax/**/*.py: relative paths and contents, sorted."""
  h = hashlib.sha256()
  for dirpath, dirnames, filenames in os.walk(PACKAGE):
    dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
    for name in sorted(f for f in filenames if f.endswith(".py")):
      path = os.path.join(dirpath, name)
      h.update(os.path.relpath(path, PACKAGE).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read() + b"\0")
  return h.hexdigest()[:16]


def fingerprint_config(scheme: str, data: dict | None = None):
  """The tiny run the fingerprint trains: 4 blocks of width 32 on `data` (default: arith)."""
  c = default.get_config()
  c.model.update(
    residual=scheme, num_blocks=4, d_model=32, num_heads=2, num_kv_heads=1, remat_policy="none"
  )
  c.data.update(dict(name="arith", arith_num_problems=2_000, seq_len=32))
  c.data.update(data or {})
  c.train.update(num_steps=FINGERPRINT_STEPS, batch_size=4, warmup_steps=1, learning_rate=1e-2)
  c.mesh.shape = (1, 1, 1)
  return c


@functools.cache
def behaviour(scheme: str) -> tuple[float, ...]:
  """Train losses of FINGERPRINT_STEPS steps, then the final parameter norm, on this code."""
  c = fingerprint_config(scheme)
  s = train.setup(c, workdir=None, devices=jax.devices()[:1])
  _, _, init_fn = builders.abstract_state(s)
  state = init_fn(jax.random.key(c.train.seed))
  step = jax.jit(steps.make_train_step(s))
  values = []
  for i in range(c.train.num_steps):
    state, out = step(state, s.dataset.train_batch(i, c.train.batch_size))
    values.append(float(out["train/loss"]))
  values.append(float(optax.tree.norm(state["params"])))
  return tuple(values)


def fingerprint_hash(values) -> str:
  """Short digest of rounded values, for display; comparisons use `same_behaviour`."""
  text = json.dumps([float(f"{v:.4g}") for v in values])
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def current(scheme: str, cache_dir: str | None = None) -> dict:
  """This checkout's provenance for runs of `scheme`; the fingerprint is cached in cache_dir
  per (source hash, scheme), so each code version pays for it once."""
  src = source_hash()
  values = None
  path = paths.join(cache_dir, f"fingerprint_{src}_{scheme}.json") if cache_dir else None
  if path and paths.exists(path):
    values = tuple(paths.read_json(path))
  if values is None:
    values = behaviour(scheme)
    if path:
      paths.makedirs(cache_dir)
      paths.write_json(path, list(values))
  return {
    "commit": git_commit(),
    "source_hash": src,
    "fingerprint": list(values),
    "fingerprint_hash": fingerprint_hash(values),
  }


def same_behaviour(a, b) -> bool:
  if not a or not b or len(a) != len(b):
    return False
  return all(
    math.isclose(x, y, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-7) for x, y in zip(a, b, strict=True)
  )


def same_code(stored: dict | None, now: dict) -> str | None:
  """'source' if the sources are identical, 'behaviour' if only the numbers match, else None.
  A record that kept only the fingerprint's digest (a runs.csv row) is compared by digest."""
  if not stored:
    return None
  if stored.get("source_hash") == now["source_hash"]:
    return "source"
  if same_behaviour(stored.get("fingerprint"), now["fingerprint"]):
    return "behaviour"
  if "fingerprint" not in stored and stored.get("fingerprint_hash") == now["fingerprint_hash"]:
    return "behaviour"
  return None
