"""Score a checkpoint: python -m keel_jax.evaluate --workdir=<dir> [--step=N] [--tasks=...].

Without --tasks: eval loss, perplexity and bits per byte on the validation split (the trainer's
eval: same step function, same batches) and, for the `arith` data, exact-match accuracy of
greedy answers; writes <workdir>/eval_step_<N>.json and prints a summary.

With --tasks=arith,piqa,...: downstream tasks (`keel_jax.tasks`), --limit examples each;
prints a Markdown table and writes <workdir>/eval/tasks_<N>.json.
"""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
from absl import app, flags

from keel_jax import checkpoint, data, paths, restore, sample, sharding, steps, tasks
from keel_jax.metrics import quiet_libraries


def exact_match_accuracy(run, dataset, num_prompts: int) -> float:
  """Greedy answers to the first `num_prompts` validation problems, scored exactly."""
  tok = run.setup.tokenizer
  problems = dataset.eval_prompts(num_prompts)
  # The answer's tokens and the EOS that ends it: a model that keeps going is wrong.
  longest = max(len(tok.encode(answer)) for _, answer in problems)
  outs = sample.generate(
    run.setup.model_cfg,
    run.params,
    [sample.encode_prompt(tok, prompt) for prompt, _ in problems],
    longest + 1,
    vocab=tok.vocab_size,
    temperature=0.0,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
  )
  return data.exact_match([tok.decode(o) for o in outs], [a for _, a in problems])


def evaluate_run(workdir: str, step: int | None = None, num_prompts: int = 200) -> dict:
  """Scores the checkpoint at `step` (default: latest) on the run's validation split and
  writes its JSON report."""
  if num_prompts < 1:
    raise ValueError(f"num_prompts={num_prompts} must be >= 1")
  run = restore.load(workdir, step)
  s, t = run.setup, run.setup.config.train
  dataset = data.make(s.config.data, seed=t.seed)
  batch_sharding = sharding.batch_sharding(s.mesh, s.rules)
  # Traced under the rules, like the trainer's eval: the same function, the same numbers.
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    eval_fn = jax.jit(steps.make_eval_step(s))
    batches = [
      jax.device_put(b, batch_sharding) for b in dataset.eval_batches(t.batch_size, t.eval_batches)
    ]
    report = {
      "step": run.step,
      **steps.evaluate(eval_fn, run.params, batches, dataset.bytes_per_token),
    }
  report["eval_sequences"] = t.batch_size * t.eval_batches
  if s.config.data.name == "arith":
    report["eval/exact_match"] = exact_match_accuracy(run, dataset, num_prompts)
    report["exact_match_prompts"] = num_prompts
  report["data_fingerprint"] = dataset.fingerprint
  path = paths.join(workdir, f"eval_step_{run.step}.json")
  paths.write_json(path, report, indent=2)  # atomic: a reader never sees half a report
  return {**report, "path": path}


def evaluate_tasks(
  workdir: str,
  names: str,
  step: int | None = None,
  limit: int | None = None,
  batch_size: int = 32,
  data_dir: str | None = None,
) -> dict:
  """Scores downstream tasks on the checkpoint at `step` (default: latest) and writes
  <workdir>/eval/tasks_<step>.json (process 0); no training data is read."""
  run_config = restore.load_config(workdir)
  chosen = tasks.for_config(names, run_config)  # unknown names fail before the restore
  run = restore.load(workdir, step)
  s = run.setup
  results = tasks.run_tasks(
    s.model_cfg,
    run.params,
    s.tokenizer,
    chosen,
    limit=limit,
    batch_size=batch_size,
    seq_len=s.config.data.seq_len,
    mesh=s.mesh,
    rules=s.rules,
    data_dir=data_dir if data_dir is not None else s.config.data.data_dir,
  )
  report = {
    "step": run.step,
    "tasks": list(results),
    "limit": limit,
    "average": tasks.average(results),
    "results": results,
  }
  path = paths.join(workdir, "eval", f"tasks_{run.step}.json")
  if jax.process_index() == 0:
    paths.write_json(path, report, indent=2)  # atomic; local or gs://
  return {**report, "path": path}


# ---------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command line's flags, defined only when it runs: modules that import this one
  (the trainer imports `sample`) have flags of their own."""
  flags.DEFINE_string("workdir", None, "A training workdir (with config.json and checkpoints).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
  flags.DEFINE_integer("num_prompts", 200, "arith: validation problems scored for exact match.")
  flags.DEFINE_string("tasks", None, "Downstream tasks, comma-separated (e.g. arith,piqa).")
  flags.DEFINE_integer("limit", None, "--tasks: score the first N examples of each task.")
  flags.DEFINE_integer("batch_size", 32, "--tasks: rows per forward pass.")
  flags.DEFINE_string("data_dir", None, "--tasks: TFDS data_dir (default: config.data.data_dir).")


def main(argv):
  del argv
  quiet_libraries()
  try:
    if not FLAGS.workdir:
      raise ValueError("--workdir is required (a directory written by keel_jax.main)")
    if FLAGS.tasks is not None:
      report = evaluate_tasks(
        FLAGS.workdir, FLAGS.tasks, FLAGS.step, FLAGS.limit, FLAGS.batch_size, FLAGS.data_dir
      )
    else:
      report = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.num_prompts)
  except (OSError, ValueError, checkpoint.CheckpointError) as e:  # OSError: e.g. no report
    sys.exit(f"error: {e}")
  if FLAGS.tasks is not None:
    print(f"step {report['step']} of {FLAGS.workdir}")
    print(tasks.markdown_table(report["results"]))
    print(f"report: {report['path']}")
    return
  print(f"step {report['step']} of {FLAGS.workdir}")
  for key, value in report.items():
    if key.startswith("eval/"):
      print(f"  {key:20s} {value:.4f}")
  print(f"report: {report['path']}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
