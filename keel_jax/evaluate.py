"""Score a checkpoint: python -m keel_jax.evaluate --workdir=<dir> [--step=N].

Eval loss, perplexity and bits per byte on the validation split (and, for the
`arith` data, exact-match accuracy of greedy answers); writes
<workdir>/eval_step_<N>.json and prints a summary.
"""

from __future__ import annotations

import json
import os
import sys

import flax.linen as nn
import jax
from absl import app, flags

from keel_jax.metrics import quiet_libraries

flags.DEFINE_string("workdir", None, "A training workdir (with config.json and checkpoints).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
flags.DEFINE_integer("num_prompts", 200, "arith: problems scored for exact match.")
FLAGS = flags.FLAGS


def exact_match_accuracy(run, num_prompts: int) -> float:
  """Greedy answers to `num_prompts` validation problems, scored exactly."""
  from keel_jax import data, sample

  ds, tok = run.setup.dataset, run.setup.dataset.tokenizer
  problems = ds.eval_prompts(num_prompts)
  longest = max(len(tok.encode(answer)) for _, answer in problems)
  outs = sample.generate(run.setup.model_cfg, run.params,
                         [[tok.bos_id] + tok.encode(p) for p, _ in problems], longest + 1,
                         vocab=tok.vocab_size, temperature=0.0, eos_id=tok.eos_id,
                         pad_id=tok.pad_id)  # fmt: skip
  return data.exact_match([tok.decode(o) for o in outs], [a for _, a in problems])


def evaluate_run(workdir: str, step: int | None = None, num_prompts: int = 200) -> dict:
  from keel_jax import restore, sharding, train

  run = restore.load(workdir, step)
  s, t = run.setup, run.setup.config.train
  batch_sharding = sharding.batch_sharding(s.mesh, s.rules)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    eval_fn = jax.jit(train.make_eval_step(s))
    batches = [
      jax.device_put(b, batch_sharding)
      for b in s.dataset.eval_batches(t.batch_size, t.eval_batches)
    ]
    report = {"step": run.step, **train.evaluate(s, eval_fn, run.params, batches)}
  if s.config.data.name == "arith":
    report["eval/exact_match"] = exact_match_accuracy(run, num_prompts)
  report["data_fingerprint"] = s.dataset.fingerprint
  path = os.path.join(workdir, f"eval_step_{run.step}.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=2)
  return {**report, "path": path}


def main(argv):
  del argv
  quiet_libraries()
  from keel_jax import checkpoint

  if not FLAGS.workdir:
    sys.exit("error: --workdir is required (a directory written by keel_jax.main)")
  try:
    report = evaluate_run(FLAGS.workdir, FLAGS.step, FLAGS.num_prompts)
  except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  for key, value in report.items():
    if key.startswith("eval/"):
      print(f"{key:20s} {value:.4f}")
  print(f"step {report['step']}; report: {report['path']}")


if __name__ == "__main__":
  app.run(main)
