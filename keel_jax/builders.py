"""Small builders from a config, one piece each: model config, mesh, optimizer, train state.

None reads data or writes files. The trainer adds the dataset (keel_jax.train.setup); sampling
and evaluation add a run's tokenizer and checkpoint (keel_jax.restore); AOT compilation and the
benchmark need only the vocabulary size (`vocab_size`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from keel_jax import optimizer, sharding
from keel_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer
from keel_jax.model import LM, ModelConfig


@dataclasses.dataclass
class Setup:
  """What a config builds before any step runs."""

  config: Any
  model_cfg: ModelConfig
  mesh: jax.sharding.Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  tokenizer: Any = None  # None where only the vocabulary size is known (AOT compilation)
  dataset: Any = None  # set by the trainer; sampling and task scoring read no training data


def vocab_size(config) -> int:
  """The model's vocabulary before rounding, from the config alone (no corpus is read)."""
  if config.model.vocab_size:
    return config.model.vocab_size
  d = config.data
  if d.tokenizer == "byte":
    return ByteTokenizer.vocab_size
  if d.get("spm_model"):
    return SentencePieceTokenizer.load(d.spm_model).vocab_size
  return d.spm_vocab_size  # SentencePiece training makes exactly this many pieces


def model_config(config, vocab: int) -> ModelConfig:
  """config.model with its vocabulary resolved: 0 → the tokenizer's, rounded up to 64."""
  d = config.model.to_dict()
  if d["vocab_size"] == 0:
    d["vocab_size"] = -(-vocab // 64) * 64  # friendlier matmul shapes
  elif d["vocab_size"] < vocab:
    raise ValueError(
      f"config.model.vocab_size={d['vocab_size']} is smaller than the tokenizer's "
      f"{vocab}; set it to 0 (automatic) or >= {vocab}"
    )
  return ModelConfig.from_dict(d)


def mesh_and_rules(config, devices=None, check_batch: bool = True):
  """The config's mesh over `devices` and its logical-axis rules; with check_batch, that the
  global batch splits over data parallelism × micro-batches."""
  t = config.train
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules(config.mesh)
  dp = sharding.data_parallel_size(mesh, rules)
  if check_batch and t.batch_size % (dp * t.grad_accum_steps):
    raise ValueError(
      f"config.train.batch_size={t.batch_size} must divide by data parallelism ({dp}) × "
      f"grad_accum_steps ({t.grad_accum_steps}); use a multiple of {dp * t.grad_accum_steps}"
    )
  return mesh, rules


def setup(config, devices=None, vocab: int | None = None, tokenizer=None, check_batch=True):
  """Model config, mesh and optimizer for `config` on `devices`; the vocabulary is the
  tokenizer's, else `vocab`, else derived from the config (`vocab_size`)."""
  optimizer.validate(config.train)
  mesh, rules = mesh_and_rules(config, devices, check_batch)
  if tokenizer is not None:
    vocab = tokenizer.vocab_size
  model_cfg = model_config(config, vocab or vocab_size(config))
  t = config.train
  return Setup(
    config, model_cfg, mesh, rules, optimizer.optimizer(t), optimizer.schedule(t), tokenizer
  )


def abstract_state(s: Setup):
  """Shapes and shardings of {step, params, opt_state} for the current mesh, and init fn."""
  model = LM(s.model_cfg)
  tokens = jnp.zeros((1, s.config.data.seq_len), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens)["params"]
    # Optax maps over the logical boxes, so the optimizer state inherits axis names.
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": s.tx.init(params)}

  boxed = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_sharding(boxed, s.mesh, s.rules)
  abstract = jax.tree.map(
    lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), nn.unbox(boxed), shardings
  )
  return abstract, shardings, lambda rng: nn.unbox(init(rng))
