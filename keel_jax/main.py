"""Train: python -m keel_jax.main --config=configs/<name>.py --workdir=<dir> [--config.x.y=v].

Multi-host: on TPU pods pass --distributed (jax.distributed.initialize() finds the
peers itself); elsewhere also give --coordinator_address, --num_processes and
--process_id.
"""

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from keel_jax import checkpoint, paths, train
from keel_jax.metrics import quiet_libraries

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py[:arg].")
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and plots go here; reruns resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_libraries()
  if FLAGS.distributed or FLAGS.num_processes:
    # Set unconditionally: only CPU devices read it, and asking jax.default_backend() first
    # would start the backend, after which initialize() refuses to run.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    train.train(FLAGS.config, FLAGS.workdir)
  except (ValueError, train.NonFiniteError, checkpoint.CheckpointError, paths.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
