"""Load a training run (its config and a checkpoint) from a workdir, for sampling and eval."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections

from keel_jax import checkpoint, train


@dataclasses.dataclass
class Run:
  setup: train.Setup
  params: Any
  step: int


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"no config.json in {workdir!r}: is it a workdir written by python -m keel_jax.main?"
    )
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def load(workdir: str, step: int | None = None) -> Run:
  """The run's setup and parameters at `step` (default: the latest valid checkpoint).

  The training mesh is not reused: the checkpoint is restored data-parallel onto
  whatever devices this process has (e.g. a pod run sampled on a laptop).
  """
  config = load_config(workdir)
  config.mesh.shape = (-1,) + (1,) * (len(config.mesh.axes) - 1)
  s = train.setup(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10**6)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first")
    if step is not None and step not in ckpt.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step}; available: {ckpt.all_steps()}")
    abstract, _, _ = train.abstract_state(s)
    state, restored = ckpt.restore(abstract, step)
  finally:
    ckpt.close()
  return Run(s, state["params"], restored)


def _tuples(x):
  """JSON lists back to tuples (mesh shapes and rules are tuples in configs)."""
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x
