"""Cells: one ordinary training run each (`keel_jax.main` into its own workdir under one root).

A cell's workdir holds what `python -m keel_jax.main` writes (config.json, checkpoints/,
metrics.jsonl), what `python -m keel_jax.evaluate` writes (eval_step_<N>.json: eval loss and,
for arith, exact-match accuracy) and cell.json: status, wall time and provenance. A finished
cell is reused when its config matches (fields that change no number are ignored) and its code
matches by source hash or behavioural fingerprint (experiments/provenance.py). Cells can be
trained here one after another, or each on its own machine with the printed command; the
experiment then aggregates whatever has finished.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from experiments import provenance
from keel_jax import evaluate, metrics, paths
from keel_jax import train as trainer

CELLS = "cells"  # <root>/cells/<name>/: one workdir per cell
# Config fields that change no trained number: a run that differs only in these is reused.
NOT_NUMERIC = {
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.diag_every",
  "train.sample_prompt",
  "data.cache_dir",
  "data.data_dir",
}


def cell_dir(root: str, name: str) -> str:
  return paths.join(root, CELLS, name)


def flat(config_dict: dict, prefix: str = "") -> dict:
  """{'a.b': value}, values as JSON gives them back (tuples → lists), so stored == fresh."""
  out = {}
  for k, v in config_dict.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flat(v, key + "."))
    else:
      out[key] = json.loads(json.dumps(v))
  return out


def same_config(stored: dict, wanted: dict) -> bool:
  """Numeric fields present in both agree; a field only one side has (added or dropped by a
  refactor) is ignored, so a new option with its old behaviour as default reuses runs."""
  a, b = flat(stored), flat(wanted)
  keys = (a.keys() & b.keys()) - NOT_NUMERIC
  return all(a[k] == b[k] for k in keys)


def read(root: str, name: str) -> dict | None:
  """The cell's record if it finished (cell.json, or a bare keel_jax.main + evaluate workdir)."""
  d = cell_dir(root, name)
  path = paths.join(d, "cell.json")
  if paths.exists(path):
    return paths.read_json(path)
  cfg_path = paths.join(d, "config.json")
  if not paths.exists(cfg_path):
    return None
  config = paths.read_json(cfg_path)
  report = paths.join(d, f"eval_step_{config['train']['num_steps']}.json")
  if not paths.exists(report):
    return None
  # Trained elsewhere with the plain commands: no wall time or provenance was recorded.
  scores = {**paths.read_json(report), **task_scores(d)}
  return {"status": "ok", "config": config, "eval": scores, "seconds": None}


def task_scores(d: str) -> dict:
  """The last downstream-task scores the run logged (config.train.task_eval_every), if any."""
  rows = [r for r in metrics.read(d) if "tasks/average" in r]
  return {k: v for k, v in rows[-1].items() if k.startswith("tasks/")} if rows else {}


def reusable(record: dict | None, config, now: dict) -> str | None:
  """'source' / 'behaviour' (see provenance.same_code) if `record` answers `config`, else None."""
  if record is None or not same_config(record["config"], config.to_dict()):
    return None
  return provenance.same_code(record.get("provenance"), now)


def commands(config_arg: str, root: str, name: str, num_prompts: int) -> str:
  """The plain commands that produce the cell on any machine (e.g. a pod slice)."""
  d = cell_dir(root, name)
  return (
    f"python -m keel_jax.main --config={shlex.quote(config_arg)} --workdir={shlex.quote(d)} && "
    f"python -m keel_jax.evaluate --workdir={shlex.quote(d)} --num_prompts={num_prompts}"
  )


def train(config, root: str, name: str, num_prompts: int, fingerprint_dir: str) -> dict:
  """Trains and scores one cell here, in this process, and writes its cell.json."""
  d = cell_dir(root, name)
  finished = paths.exists(paths.join(d, "cell.json"))
  if finished and not paths.is_remote(d):  # made by other config or code: kept aside
    os.replace(d, f"{d}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
  elif paths.exists(d):  # unfinished (or a bucket's stale cell): start clean
    paths.rmtree(d)
  now = provenance.current(config.model.residual, fingerprint_dir)
  t0, load = time.perf_counter(), os.getloadavg()[0]
  status, error, report = "ok", "", {}
  try:
    trainer.train(config, d)
  except trainer.NonFiniteError as e:
    status, error = "nonfinite", str(e)
  if status == "ok":  # what `python -m keel_jax.evaluate` writes (arith: with exact match)
    report = evaluate.evaluate_run(d, num_prompts=num_prompts)
  record = {
    "status": status,
    "error": error,
    "seconds": time.perf_counter() - t0,
    "load_average_at_start": load,
    "eval": {**{k: v for k, v in report.items() if k.startswith("eval/")}, **task_scores(d)},
    "config": config.to_dict(),
    "provenance": now,
  }
  paths.write_json(paths.join(d, "cell.json"), record, indent=1)
  return record


def train_in_subprocess(experiment: str, config_args, root: str, cell: str, log) -> int:
  """Runs `python -m experiments.<experiment> <config_args> --config.cell=<cell>` (one cell) in a
  fresh process: a crash or leak in one run cannot take the sweep down."""
  cmd = [sys.executable, "-m", f"experiments.{experiment}", *config_args,
         f"--workdir={root}", f"--config.cell={cell}"]  # fmt: skip
  return subprocess.run(cmd, cwd=provenance.ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
