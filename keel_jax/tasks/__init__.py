"""Downstream evaluation: score a model on named tasks.

  from keel_jax import tasks
  results = tasks.run_tasks(model_cfg, params, tokenizer, ["arith", "piqa"], limit=500)
  results["arith"]["exact_match"]  # {"value": 0.41, "stderr": 0.02, "n": 500}
  tasks.average(results)  # mean of each task's primary metric (the paper's Table 3 average)

Task kinds live in `kinds`, the task list in `catalog`, batched scoring in `scoring`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax

from keel_jax.tasks.catalog import TASKS, arith_task
from keel_jax.tasks.kinds import Generative, LastWord, Model, MultipleChoice, Task
from keel_jax.tasks.scoring import Mesh, mean_and_stderr

__all__ = [
  "TASKS",
  "Generative",
  "LastWord",
  "Model",
  "MultipleChoice",
  "Task",
  "arith_task",
  "average",
  "for_config",
  "markdown_table",
  "resolve",
  "run_tasks",
]


def resolve(names: str | Sequence[str | Task]) -> list[Task]:
  """Tasks from names ('arith,piqa' or a list; Task objects pass through); unknown names raise
  ValueError listing the known ones."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  if not names:
    raise ValueError(f"no task named; choose from {', '.join(TASKS)}")
  out = []
  for n in names:
    if not isinstance(n, str):
      out.append(n)
    elif n in TASKS:
      out.append(TASKS[n])
    else:
      raise ValueError(f"unknown task {n!r}; known tasks: {', '.join(TASKS)}")
  return out


def for_config(names: str | Sequence[str | Task], config) -> list[Task]:
  """`resolve(names)` for a training run: `arith` at the run's difficulty and held-out fraction
  when it trained on arith (config.data.arith_steps, val_fraction)."""
  out = resolve(names)
  d = config.data
  if d.name == "arith":
    arith = arith_task(steps=d.arith_steps, val_fraction=d.val_fraction)
    out = [arith if t is TASKS["arith"] else t for t in out]
  return out


def run_tasks(
  model_cfg,
  params,
  tokenizer,
  names: str | Sequence[str | Task],
  *,
  limit: int | None = None,
  batch_size: int = 32,
  seq_len: int | None = None,
  mesh: jax.sharding.Mesh | None = None,
  rules: tuple | None = None,
  data_dir: str | None = None,
) -> dict[str, dict[str, dict]]:
  """Scores each task → {task: {metric: {"value", "stderr", "n"}}} (plus "seconds" per task).

  limit: the first N examples of each task. seq_len: the longest model input (the run's
  config.data.seq_len); longer requests are truncated from the left. mesh/rules: score on the
  run's mesh, rows sharded over its batch axes (rules default to batch → data, fsdp); every
  host gets the same numbers. data_dir: where TFDS datasets are prepared.
  """
  if limit is not None and limit < 1:
    raise ValueError(f"limit={limit} must be >= 1 (or None for every example)")
  tasks = resolve(names)  # unknown names fail before any data is read
  where = None
  if mesh is not None:
    if rules is None:
      rules = (("batch", tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)),)
    where = Mesh(mesh, tuple(rules))
  model = Model(model_cfg, params, tokenizer, batch_size, seq_len, where)
  results = {}
  for task in tasks:
    t0 = time.perf_counter()
    docs = task.docs(data_dir)
    docs = docs[: min(limit, len(docs))] if limit else docs[: len(docs)]
    if not len(docs):
      raise ValueError(f"task {task.name!r} has no examples")
    per_example = task.run(model, docs)
    row = {}
    for metric, values in per_example.items():
      value, stderr = mean_and_stderr(values)
      row[metric] = {"value": value, "stderr": stderr, "n": len(values)}
    results[task.name] = {**row, "seconds": time.perf_counter() - t0}
  return results


def primary(task_name: str) -> str:
  return TASKS[task_name].primary if task_name in TASKS else "acc"


def average(results: dict) -> float:
  """Mean over tasks of each task's primary metric (acc_norm, acc or exact_match)."""
  values = []
  for name, row in results.items():
    metric = primary(name) if primary(name) in row else next(k for k in row if k != "seconds")
    values.append(row[metric]["value"])
  return sum(values) / len(values)


def markdown_table(results: dict) -> str:
  """A Markdown table: task, metric, value, stderr, n."""
  lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
  for name, row in results.items():
    for metric, r in row.items():
      if metric == "seconds":
        continue
      stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
      lines.append(f"| {name} | {metric} | {r['value']:.4f} | {stderr} | {r['n']} |")
  if len(results) > 1:
    lines.append(f"| **average** | primary | {average(results):.4f} | | |")
  return "\n".join(lines)
