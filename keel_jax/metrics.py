"""Where metrics go: metrics.jsonl, TensorBoard events, a console progress line, a loss plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from keel_jax import paths


class Writer:
  """Writes one JSON object per logged step; only process 0 writes."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled
    self.total_steps = total_steps
    self.path = paths.join(workdir, "metrics.jsonl")
    self._tb = None
    self._t0 = time.perf_counter()
    self._first_step = None
    if enabled:
      from tensorboardX import SummaryWriter  # imported lazily: pulls in protobuf

      _route_remote_events()
      self._tb = SummaryWriter(paths.join(workdir, "tensorboard"))

  def write(self, step: int, row: dict) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: plain(v) for k, v in row.items()}}
    paths.append_text(self.path, json.dumps(row) + "\n")
    for k, v in row.items():
      if k != "step" and isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(k, v, step)
      elif isinstance(v, list) and v and all(isinstance(x, float) and math.isfinite(x) for x in v):
        self._tb.add_histogram(k, np.asarray(v), step)
    self._tb.flush()

  def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
    """One console line: step, loss, throughput, ETA."""
    if not self.enabled:
      return
    if self._first_step is None:
      self._first_step, self._t0 = step, time.perf_counter()
    done = step - self._first_step
    rate = done / max(time.perf_counter() - self._t0, 1e-9)
    eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    line = (
      f"[{bar}] step {step}/{self.total_steps} | loss {loss:.4f} | "
      f"{tokens_per_sec:,.0f} tok/s | ETA {_duration(eta)}"
    )
    end = "\r" if sys.stderr.isatty() else "\n"
    print(line, end=end, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self.enabled and sys.stderr.isatty():
      print(file=sys.stderr)

  def abandon(self) -> None:
    """The run is failing: events still buffered for a bucket are dropped, not uploaded (the
    bucket may be what failed, and each try would wait out the client's retries)."""
    for f in _BufferedEventFiles.opened:
      f.dead = True


class _BufferedEventFile:
  """A TensorBoard event file on an object store: kept in memory, uploaded whole at each flush
  (stores cannot append; event files of a run are small)."""

  def __init__(self, path: str):
    self.path, self._data, self._uploaded = path, bytearray(), 0
    self.dead = False  # after a failed upload or an abandoned run: no more uploads

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    if self.dead or len(self._data) == self._uploaded:
      return
    try:
      paths.write_bytes(self.path, bytes(self._data))
    except paths.StorageError:
      # Raised once (the run stops with it); tensorboardX's exit hook must not wait again.
      self.dead = True
      raise
    self._uploaded = len(self._data)

  def close(self) -> None:
    self.flush()


class _BufferedEventFiles:
  opened: list[_BufferedEventFile] = []

  def open(self, path: str) -> _BufferedEventFile:
    self.opened.append(_BufferedEventFile(path))
    return self.opened[-1]

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def _route_remote_events() -> None:
  """Makes tensorboardX write gs:// event files through `paths` (its own gs:// writer needs a
  second GCS client and its credentials); local event files are untouched."""
  from tensorboardX import record_writer

  record_writer.register_writer_factory("gs", _BufferedEventFiles())


def quiet_libraries() -> None:
  """Orbax and friends log every file operation at INFO via absl; keep the console readable."""
  from absl import logging

  if logging.get_verbosity() > logging.WARNING:
    logging.set_verbosity(logging.WARNING)
  import logging as std_logging

  # gcsfs logs every exhausted retry with a traceback; keel_jax.paths reports the failure in one
  # line (StorageError), and its bucket-type probe warns on every emulator or HNS-less bucket.
  std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)
  # Orbax logs a failed background save with its traceback before our CheckpointError reports it
  # in one line: keep Orbax's line, drop the traceback.
  absl_logger = std_logging.getLogger("absl")
  if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOrbaxTracebacks())


class _NoOrbaxTracebacks:
  def filter(self, record) -> bool:
    if "orbax" in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def read(workdir: str) -> list[dict]:
  path = paths.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  return [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]


def plot_loss(workdir: str, out_name: str = "loss.png") -> str | None:
  """Train and eval loss against step, from metrics.jsonl."""
  rows = read(workdir)
  train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
  if not train:
    return None
  # A bare Figure, not pyplot: switching backends would break inline plots in notebooks.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  ax.plot(*zip(*train, strict=True), label="train")
  if evals:
    ax.plot(*zip(*evals, strict=True), "o-", label="eval")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(os.path.basename(paths.resolve(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return paths.save_figure(fig, paths.join(workdir, out_name), dpi=120)


def plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else [float(x) for x in v.reshape(-1)]


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
