"""Scoring requests against a model: continuation log-likelihoods and greedy answers.

`loglikelihoods` scores (context, continuation) token pairs in padded, batched forward passes,
optionally sharded over a mesh; `greedy` decodes answers through the KV cache (`sample`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from keel_jax import sample, sharding
from keel_jax.model import LM, ModelConfig

MIN_LEN = 16  # shortest padded row: lengths are rounded up to powers of two from here


@dataclasses.dataclass(frozen=True)
class Mesh:
  """Where to score: a mesh and its logical-axis rules (the run's, see train.Setup)."""

  mesh: jax.sharding.Mesh
  rules: tuple

  @property
  def data_parallel(self) -> int:
    return sharding.data_parallel_size(self.mesh, self.rules)


def window(context: Sequence[int], continuation: Sequence[int], seq_len: int | None):
  """(inputs, targets, first scored index) of one request, truncated from the left.

  The model reads `context + continuation[:-1]` and is scored on `continuation`; when that is
  longer than `seq_len` tokens the oldest context tokens are dropped (and, should the
  continuation alone exceed it, its first tokens are no longer scored).
  """
  if not context:
    raise ValueError("a request needs at least one context token (e.g. EOS)")
  if not continuation:
    raise ValueError("a request needs at least one continuation token")
  seq = list(context) + list(continuation)
  if seq_len is not None and len(seq) - 1 > seq_len:
    seq = seq[len(seq) - 1 - seq_len :]
  inputs, targets = seq[:-1], seq[1:]
  first = max(len(targets) - len(continuation), 0)
  return inputs, targets, first


def _bucket(n: int, cap: int | None) -> int:
  b = max(MIN_LEN, 1 << (n - 1).bit_length())
  return min(b, cap) if cap is not None else b


@functools.cache
def _score_fn(cfg: ModelConfig, mesh: Mesh | None):
  """jit(params, tokens, targets, mask) → (sum of target log-probs, all targets greedy) per row."""
  model = LM(dataclasses.replace(cfg, remat_policy="none"))  # no gradients: nothing to remat

  def score(params, tokens_BxT, targets_BxT, mask_BxT):
    logits_BxTxV = model.apply({"params": params}, tokens_BxT).astype(jnp.float32)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
    ll_B = jnp.sum(jnp.where(mask_BxT, target_BxT, 0.0), axis=1)
    all_greedy_B = jnp.all(greedy_BxT | ~mask_BxT, axis=1)
    return ll_B, all_greedy_B

  if mesh is None:
    return jax.jit(score)
  # Rows are sharded over the batch axes; every host gets every row's score back.
  return jax.jit(score, out_shardings=NamedSharding(mesh.mesh, PartitionSpec()))


def _global(x: np.ndarray, mesh: Mesh):
  """A global array from the same full numpy array on every host (each places its shards)."""
  s = sharding.batch_sharding(mesh.mesh, mesh.rules)
  return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])


def loglikelihoods(
  cfg: ModelConfig,
  params,
  requests: Sequence[tuple[Sequence[int], Sequence[int]]],
  *,
  batch_size: int = 32,
  seq_len: int | None = None,
  pad_id: int = 0,
  mesh: Mesh | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(log p(continuation | context), whether greedy decoding yields the continuation) per
  request, in request order.

  Requests are sorted by length and scored `batch_size` rows at a time, right-padded to a power
  of two (at most `seq_len`), so a task compiles a handful of shapes. With `mesh` the rows are
  sharded over its batch axes; on several hosts every host must pass the same requests.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  if mesh is not None:
    dp = mesh.data_parallel
    batch_size = -(-batch_size // dp) * dp  # rows split evenly over the batch shards
  rows = [window(c, x, seq_len) for c, x in requests]
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  ll_N = np.zeros(len(rows), np.float64)
  greedy_N = np.zeros(len(rows), bool)
  fn = _score_fn(cfg, mesh)
  for start in range(0, len(order), batch_size):
    idx = order[start : start + batch_size]
    t = _bucket(len(rows[idx[0]][0]), seq_len)
    tokens = np.full((batch_size, t), pad_id, np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    mask = np.zeros((batch_size, t), bool)
    for r, i in enumerate(idx):
      inputs, tgt, first = rows[i]
      tokens[r, : len(inputs)] = inputs
      targets[r, : len(tgt)] = tgt
      mask[r, first : len(tgt)] = True
    if mesh is None:
      ll_B, greedy_B = fn(params, tokens, targets, mask)
    else:
      with jax.set_mesh(mesh.mesh), nn.logical_axis_rules(mesh.rules):
        args = [_global(a, mesh) for a in (tokens, targets, mask)]
        ll_B, greedy_B = fn(params, *args)
    ll_B, greedy_B = jax.device_get((ll_B, greedy_B))
    ll_N[idx] = ll_B[: len(idx)]
    greedy_N[idx] = greedy_B[: len(idx)]
  return ll_N, greedy_N


def greedy(
  cfg: ModelConfig,
  params,
  prompts: Sequence[Sequence[int]],
  max_new_tokens: int,
  *,
  vocab: int,
  eos_id: int,
  pad_id: int = 0,
  batch_size: int = 32,
  mesh: Mesh | None = None,
) -> list[list[int]]:
  """Greedy continuations (cut before EOS) of `prompts`, `batch_size` at a time.

  Every batch is padded to the same rows and prompt length, so one compile serves the task.
  With `mesh` it runs under the mesh's rules, rows sharded over its batch axes; on several hosts
  every host passes the same prompts, decodes its own rows and gets every row back.
  """
  if mesh is not None:
    dp = mesh.data_parallel
    batch_size = -(-batch_size // dp) * dp
  else:
    batch_size = min(batch_size, len(prompts))  # no padding rows for a small task
  pad_to = max(len(p) for p in prompts)
  out: list[list[int]] = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    n = len(chunk)
    chunk += [chunk[0]] * (batch_size - n)  # same shape for the last batch
    kwargs = dict(vocab=vocab, temperature=0.0, eos_id=eos_id, pad_id=pad_id, pad_to=pad_to)
    if mesh is None:
      outs = sample.generate(cfg, params, chunk, max_new_tokens, **kwargs)
    else:
      with jax.set_mesh(mesh.mesh), nn.logical_axis_rules(mesh.rules):
        outs = sample.generate(cfg, params, chunk, max_new_tokens, **kwargs)
    out.extend(outs[:n])
  return out


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
  """Mean and its standard error (sample standard deviation / √n); None below two values."""
  x = np.asarray(values, np.float64)
  if x.size == 0:
    raise ValueError("no values to average")
  if x.size < 2:
    return float(x.mean()), None
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))
