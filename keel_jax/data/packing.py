"""Packing and batch order: documents → one token stream → fixed windows → stateless batches.

The stream is every document's tokens followed by EOS. Window k is stream[k·L : k·L + L + 1]
(inputs are its first L tokens, targets its last L). The global sample g = step·B + row reads
window perm_e(g mod W) with epoch e = g div W and perm_e a keyed bijection of [0, W): a batch
is a pure function of (seed, step, process index/count), so resuming needs no iterator state,
each epoch visits every window once, and each host computes only its own rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

_ROUNDS = 4
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def pack(token_arrays: Iterable[np.ndarray], eos_id: int, dtype=np.int32) -> np.ndarray:
  """Concatenates documents, each followed by EOS; empty documents are dropped."""
  parts = []
  eos = np.array([eos_id], dtype)
  for ids in token_arrays:
    if len(ids):
      parts += [np.asarray(ids, dtype), eos]
  return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def num_windows(num_tokens: int, seq_len: int) -> int:
  """Windows of seq_len + 1 tokens at stride seq_len (consecutive windows share one token)."""
  return max(0, (num_tokens - 1) // seq_len)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer: a cheap, well-scrambling uint64 → uint64 hash."""
  x = (x ^ (x >> _S30)) * _M1
  x = (x ^ (x >> _S27)) * _M2
  return x ^ (x >> _S31)


def permute(index_N: np.ndarray, n: int, key: Sequence[int]) -> np.ndarray:
  """A keyed pseudo-random bijection of [0, n), evaluated pointwise in O(1) memory.

  A balanced Feistel network permutes [0, 4^k) ⊇ [0, n); values that land outside [0, n) are
  permuted again (cycle walking), which keeps it a bijection of [0, n). 4^k < 4n, so each value
  needs < 4 passes on average.
  """
  half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
  mask = np.uint64((1 << half) - 1)
  keys = np.random.SeedSequence(list(key)).generate_state(_ROUNDS, np.uint64)
  h = np.uint64(half)

  def feistel(x):
    left, right = x >> h, x & mask
    for k in keys:
      left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << h) | right

  x = np.asarray(index_N, np.uint64)
  if x.size and (x.max() >= n):
    raise ValueError(f"permute: index out of range [0, {n})")
  with np.errstate(over="ignore"):  # uint64 wrap-around is the hash
    x = feistel(x)
    while (out := x >= n).any():
      x[out] = feistel(x[out])
  return x.astype(np.int64)


def train_windows(
  step: int, batch_size: int, process_index: int, process_count: int, n: int, seed: int
) -> np.ndarray:
  """Window indices of this process's rows of the global batch at `step`."""
  local = batch_size // process_count
  g_N = step * batch_size + process_index * local + np.arange(local, dtype=np.int64)
  epoch_N, pos_N = np.divmod(g_N, n)
  out_N = np.empty_like(pos_N)
  for e in np.unique(epoch_N):  # a batch spans at most two epochs (more only if B > W)
    sel = epoch_N == e
    out_N[sel] = permute(pos_N[sel], n, (seed, int(e)))
  return out_N


def eval_windows(num: int, n: int) -> np.ndarray:
  """`num` fixed window indices spread evenly over the validation stream (-1: padding rows)."""
  if num <= n:
    return np.arange(num, dtype=np.int64) * n // num
  return np.concatenate([np.arange(n), -np.ones(num - n, np.int64)])


def gather(tokens: np.ndarray, windows_N: np.ndarray, seq_len: int, pad_id: int) -> dict:
  """The batch for these window indices; index -1 gives a padding row with weight 0."""
  valid_N = windows_N >= 0
  offsets_NxT = np.where(valid_N, windows_N, 0)[:, None] * seq_len + np.arange(seq_len + 1)
  x_NxT = np.asarray(tokens[offsets_NxT], np.int32)
  x_NxT[~valid_N] = pad_id
  weights_NxL = np.broadcast_to(valid_N[:, None], (len(windows_N), seq_len)).astype(np.float32)
  return {
    "inputs": np.ascontiguousarray(x_NxT[:, :-1]),
    "targets": np.ascontiguousarray(x_NxT[:, 1:]),
    "weights": weights_NxL,
  }


def eval_batches(
  tokens, num_val_windows, batch_size, num_batches, process_index, local, seq_len, pad_id
) -> list[dict]:
  """This process's rows of the fixed validation batches: windows spread evenly over the set;
  rows past its end have weight 0."""
  total = batch_size * num_batches
  if total > num_val_windows:
    logging.warning(
      "validation set has %d sequences; %d of %d eval rows are padding",
      num_val_windows, total - num_val_windows, total,
    )  # fmt: skip
  w_BxN = eval_windows(total, num_val_windows).reshape(num_batches, batch_size)
  rows = slice(process_index * local, (process_index + 1) * local)
  return [gather(tokens, w_N[rows], seq_len, pad_id) for w_N in w_BxN]
