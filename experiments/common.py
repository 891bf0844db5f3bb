"""Shared plumbing of the paper-reproduction experiments: runs, tables, reports, command line.

Every experiment is `run(config, workdir) -> dict` plus `main = common.main(run)`. Training
runs go through the real trainer (`train.train`) into `<workdir>/runs/<name>/`; a finished run
leaves `result.json` there and is reused when the same config asks for it again, so an
interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import flax
import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from experiments import cells, provenance
from keel_jax import data, paths, residual, train
from keel_jax.metrics import quiet_libraries

RUNS = "runs"  # per-run subdirectories (checkpoints, metrics); ignored by git
_run_seconds: list[float] = []  # training time of every run returned, reused ones included


# ---------------------------------------------------------------- configs


def fmt_lr(lr: float) -> str:
  return f"{lr:.3g}"


def run_name(scheme: str, num_blocks: int, lr: float | None = None) -> str:
  name = f"{scheme}_L{residual.sublayers(num_blocks)}"
  return name if lr is None else f"{name}_lr{fmt_lr(lr)}"


# ---------------------------------------------------------------- training runs


def train_run(config, run_dir: str) -> dict:
  """Trains `config` into run_dir (or reuses a finished identical run).

  Returns {status: ok|nonfinite, error, seconds, final: last metrics, fingerprint (of the data),
  provenance, code}: a finished run is reused when its config matches (experiments/cells) and
  its code does (experiments/provenance): code = 'source' (same keel_jax/ sources) or
  'behaviour' (older sources, same numbers). A NaN/Inf step under config.train.nonfinite='stop'
  is a result here, not a failure.
  """
  done = paths.join(run_dir, "result.json")
  config_json = config.to_json_best_effort(sort_keys=True)
  # Fingerprints are cached beside runs/: each code version trains them once per scheme.
  cache = paths.join(os.path.dirname(os.path.dirname(paths.resolve(run_dir))), "provenance")
  now = lambda: provenance.current(config.model.residual, cache)
  if paths.exists(done):
    result = paths.read_json(done)
    stored = json.loads(result.get("config", "{}"))
    if cells.same_config(stored, json.loads(config_json)):
      prov = result.get("provenance")
      code = "source" if prov and prov["source_hash"] == provenance.source_hash() else None
      code = code or provenance.same_code(prov, now())
      if code:  # made by this code, or by code whose numbers are the same
        _run_seconds.append(result["seconds"])
        return {**result, "code": code}
    if not paths.is_remote(run_dir):  # finished by another config or code: kept aside
      os.replace(run_dir, f"{run_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
  if paths.exists(run_dir):  # unfinished (or a bucket's other run): start clean
    paths.rmtree(run_dir)
  prov = now()
  t0 = time.perf_counter()
  status, error, final = "ok", "", {}
  try:
    final = train.train(config, run_dir)
  except train.NonFiniteError as e:
    status, error = "nonfinite", str(e)
  result = {
    "status": status,
    "error": error,
    "seconds": time.perf_counter() - t0,
    "final": final,
    "fingerprint": read_json(paths.join(run_dir, "data_fingerprint.json")),
    "config": config_json,
    "provenance": prov,
  }
  paths.write_json(done, result, indent=1)
  _run_seconds.append(result["seconds"])
  return {**result, "code": "source"}


def annotate(run_dir: str, **values) -> dict:
  """Adds `values` to a finished run's result.json (e.g. scores computed after training)."""
  path = paths.join(run_dir, "result.json")
  result = {**read_json(path), **values}
  paths.write_json(path, result, indent=1)
  return result


def read_json(path: str):
  return paths.read_json(path)


def finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def unigram_loss(config) -> float:
  """Eval loss of the best context-free model: validation tokens scored by training-token
  frequencies (add-one smoothed). A run near it has learned only token frequencies."""
  ds = data.make(config.data)
  vocab = ds.tokenizer.vocab_size
  seen = np.bincount(np.asarray(ds._train).ravel(), minlength=vocab) + 1.0
  val = np.bincount(np.asarray(ds._val).ravel(), minlength=vocab)
  return float(-(val * np.log(seen / seen.sum())).sum() / val.sum())


# ---------------------------------------------------------------- where and how it ran


def environment() -> dict:
  """Command, date, machine, library versions: written beside every table."""

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
    info = {k.strip(): v.strip() for k, v in info.items()}
    cpu = f"{info['model name']} (family {info['cpu family']}, model {info['model']})"
  except (OSError, KeyError):
    pass
  module = os.path.splitext(os.path.relpath(sys.argv[0]))[0].replace(os.sep, ".")
  return {
    "command": " ".join(["python -m", module, *map(shlex.quote, sys.argv[1:])]),  # pasteable
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "machine": f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, {platform.system()}",
    "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind}) × {jax.device_count()}",
    "versions": f"python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}",
    "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
  }


def peak_rss_mb() -> float:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- tables, plots, reports


def write_table(path_stem: str, columns: Sequence[str], rows: Sequence[dict], digits=4) -> str:
  """rows → <stem>.csv and <stem>.md; returns the Markdown."""
  buf = io.StringIO(newline="")
  w = csv.DictWriter(buf, columns, extrasaction="ignore")
  w.writeheader()
  w.writerows(rows)
  paths.write_text(path_stem + ".csv", buf.getvalue())
  md = markdown_table(columns, rows, digits)
  paths.write_text(path_stem + ".md", md)
  return md


def markdown_table(columns: Sequence[str], rows: Sequence[dict], digits=4) -> str:
  """rows as a Markdown table; floats to `digits` significant digits."""

  def cell(v):
    if isinstance(v, float):
      return "nan" if not math.isfinite(v) else f"{v:.{digits}g}"
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, path: str) -> str:
  """Grids every axes, then writes a small PNG and closes the figure."""
  for ax in fig.axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=90)  # small PNGs: they are committed
  pyplot().close(fig)
  return path


def write_readme(
  workdir: str,
  title: str,
  claim: str,
  env: dict,
  fingerprint: dict | None,
  sections: Sequence[tuple[str, str]],
  verdict: Sequence[str],
  seconds: float,
  run_seconds: float | None = None,
) -> str:
  """README.md: what the paper claims, how this ran, the tables and a verdict. `run_seconds`:
  the training time of the runs it aggregates, where they were trained by other processes
  (default: those this process trained or reused)."""
  lines = [f"# {title}", "", f"**Paper:** {claim}", "", "## Verdict", ""]
  lines += [f"* {v}" for v in verdict]
  lines += ["", "## Run", ""]
  lines += [f"* {k}: `{v}`" if k == "command" else f"* {k}: {v}" for k, v in env.items()]
  wall = f"* wall time: {seconds / 60:.1f} min"
  if run_seconds is None and _run_seconds:
    run_seconds = sum(_run_seconds)
  if run_seconds:
    wall += (
      f"; its training runs took {run_seconds / 60:.1f} min when they ran (a rerun reuses "
      "finished runs)"
    )
  lines.append(wall)
  if fingerprint:
    keys = ("name", "python", "content_sha256", "num_train_tokens", "num_val_tokens", "cache_key")
    fp = ", ".join(f"{k}={fingerprint[k]}" for k in keys if k in fingerprint)
    lines.append(f"* corpus fingerprint: {fp} (full: data_fingerprint.json)")
  for heading, body in sections:
    lines += ["", f"## {heading}", "", body.rstrip()]
  path = paths.join(workdir, "README.md")
  paths.write_text(path, "\n".join(lines) + "\n")
  if fingerprint:
    paths.write_json(paths.join(workdir, "data_fingerprint.json"), fingerprint, indent=2)
  return path


# ---------------------------------------------------------------- command line


def main(run: Callable[[ml_collections.ConfigDict, str], dict]) -> None:
  """`python -m experiments.<name> --config=configs/<name>.py:<size> --workdir=<dir>`."""
  config_flags.DEFINE_config_file("config", None, "Experiment config, e.g. configs/x.py:cpu.")
  flags.DEFINE_string("workdir", None, "Tables, plots, README.md and runs/ go here.")
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    del argv
    quiet_libraries()
    config = flags.FLAGS.config
    if config.compilation_cache:
      jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compilation_cache))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    paths.makedirs(flags.FLAGS.workdir)
    run(config, flags.FLAGS.workdir)

  app.run(_main)
