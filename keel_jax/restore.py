"""Load a training run from its workdir for sampling and evaluation: config, tokenizer, model
and checkpoint; the training data is not read."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

from keel_jax import builders, checkpoint, data, paths
from keel_jax.data import tokenizers


@dataclasses.dataclass
class Run:
  setup: builders.Setup  # its tokenizer set; no dataset
  params: Any
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = paths.join(workdir, "config.json")
  if not paths.isfile(path):
    raise FileNotFoundError(
      f"no config.json in {workdir!r}: is it a workdir written by python -m keel_jax.main?"
    )
  try:
    return ml_collections.ConfigDict(_tuples(paths.read_json(path)))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"cannot read {path}: {e}") from e


def tokenizer(config, workdir: str):
  """The run's tokenizer: bytes, or the SentencePiece model the trainer kept in the workdir
  (runs from before it kept one: config.data.spm_model, else rebuilt from the corpus)."""
  d = config.data
  if d.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  kept = paths.join(workdir, tokenizers.RUN_FILE)
  if paths.exists(kept):
    return tokenizers.SentencePieceTokenizer(paths.read_bytes(kept))
  if d.get("spm_model"):
    return tokenizers.SentencePieceTokenizer.load(paths.resolve(d.spm_model))
  return data.make(d, seed=config.train.seed).tokenizer


def setup(config, workdir: str) -> builders.Setup:
  """The run's model and tokenizer, data-parallel on this process's devices; no writes."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.shape = (-1,) + (1,) * (len(config.mesh.axes) - 1)
  return builders.setup(config, tokenizer=tokenizer(config, workdir), check_batch=False)


def load(workdir: str, step: int | None = None) -> Run:
  """The run's setup and parameters at `step` (default: the latest valid checkpoint).

  The training mesh is not reused: the checkpoint is restored data-parallel onto
  whatever devices this process has (e.g. a pod run sampled on a laptop).
  Raises FileNotFoundError, ValueError or checkpoint.CheckpointError with one line.
  """
  config = load_config(workdir)
  directory = paths.join(workdir, "checkpoints")
  # Steps are checked on disk before Orbax opens the directory: opening it creates the directory
  # and starts a clean-up thread that logs a traceback if the process exits before it is done.
  steps = _step_dirs(directory)
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {directory}; train first")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; have {steps}")
  s = setup(config, workdir)
  abstract, _, _ = builders.abstract_state(s)
  ckpt = checkpoint.Checkpointer(directory, keep=10**6)
  try:
    state, restored = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return Run(s, state["params"], restored)


def _step_dirs(directory: str) -> list[int]:
  """Steps saved under `directory`: Orbax names a finished step's directory by its number."""
  names = paths.listdir(directory)
  return sorted(int(n) for n in names if n.isdigit() and paths.isdir(paths.join(directory, n)))


def _tuples(x):
  """JSON lists back to tuples (mesh shapes and rules are tuples in configs)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x
