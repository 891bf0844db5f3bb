"""Streaming input for TFDS datasets: Grain over `tfds.data_source`; nothing is pre-tokenized.

Documents are read by index from array_record files (local or gs://). Step s on host h of P:
  train documents, shuffled (a new permutation each epoch, keyed by the seed)
  → every P-th from h (a host reads only its own records)
  → the next K of them (K = documents per step, fixed at start-up from a sample of the split)
  → tokenized, each followed by EOS, concatenated and cut into the host's rows of seq_len + 1
    tokens (what does not fit is dropped; a shortfall is padding with weight 0).
So step s is element s of a Grain `MapDataset`: a pure function of (seed, s, host), and a resumed
run reads the same batches with no iterator state to checkpoint. Batches are computed ahead of
the trainer by Grain's prefetching threads (config.data.num_threads).
Eval reads a fixed subset: the validation split's first documents, up to max_eval_tokens.
"""

from __future__ import annotations

import math
import platform
import threading

import numpy as np

from keel_jax.data import packing, tokenizers

SAMPLE_DOCS = 64  # documents tokenized at start-up to size K
OVERFILL = 1.25  # K reads this many times the tokens a step needs, so few steps fall short


def _pack_rows(token_arrays, rows: int, seq_len: int, eos_id: int, pad_id: int) -> dict:
  """Documents (with EOS) concatenated into `rows` rows of seq_len + 1; padding has weight 0."""
  stream = packing.pack(token_arrays, eos_id, np.int32)
  need = rows * (seq_len + 1)
  x_NxT = np.full((need,), pad_id, np.int32)
  x_NxT[: min(need, stream.size)] = stream[:need]
  x_NxT = x_NxT.reshape(rows, seq_len + 1)
  # A target counts if its token came from a document.
  pos_NxL = np.arange(rows)[:, None] * (seq_len + 1) + np.arange(1, seq_len + 1)
  return {
    "inputs": np.ascontiguousarray(x_NxT[:, :-1]),
    "targets": np.ascontiguousarray(x_NxT[:, 1:]),
    "weights": (pos_NxL < stream.size).astype(np.float32),
  }


class StreamingDataset:
  """The `Dataset` interface (train_batch, eval_batches, fingerprint, ...) over a TFDS split."""

  def __init__(self, c, seed: int, corpus, tokenizer):
    import grain

    self._grain = grain
    self.name, self.seq_len, self.seed = c.name, c.seq_len, int(seed)
    self.tokenizer = tokenizer
    self._corpus = corpus
    self._train_docs, val_docs = corpus.splits
    self._num_threads = c.num_threads
    if len(self._train_docs) < 1 or len(val_docs) < 1:
      raise ValueError(f"{c.name!r} has an empty train or validation split; check the splits")

    # Mean tokens per training document (with its EOS), from documents spread over the split.
    n = len(self._train_docs)
    idx = sorted({i * n // min(n, SAMPLE_DOCS) for i in range(min(n, SAMPLE_DOCS))})
    sample = tokenizer.encode_batch([self._train_docs[i] for i in idx])
    self.mean_doc_tokens = float(np.mean([len(t) + 1 for t in sample]))

    # The fixed eval set: the first validation documents, up to max_eval_tokens.
    val_arrays, val_bytes, val_tokens, docs = [], 0, 0, 0
    cap = c.max_eval_tokens or math.inf
    for start in range(0, len(val_docs), 64):
      texts = val_docs[start : start + 64]
      for text, ids in zip(texts, tokenizer.encode_batch(texts), strict=True):
        if len(ids) and val_tokens < cap:
          val_arrays.append(ids)
          val_tokens += len(ids) + 1
          val_bytes += len(tokenizers.utf8_bytes(text))
          docs += 1
      if val_tokens >= cap:
        break
    self._val = packing.pack(val_arrays, tokenizer.eos_id, np.int32)
    self.num_val_windows = packing.num_windows(self._val.size, c.seq_len)
    if self.num_val_windows < 1:
      raise ValueError(
        f"the validation split of {c.name!r} has {self._val.size} tokens, less than one sequence "
        f"of config.data.seq_len + 1 = {c.seq_len + 1}; lower seq_len or use a larger split"
      )
    self.bytes_per_token = val_bytes / max(self._val.size, 1)
    # An estimate (the split is never tokenized whole); the trainer only warns with it.
    self.num_train_windows = int(n * self.mean_doc_tokens // (c.seq_len + 1))
    self.fingerprint = {
      "name": c.name,
      "python": platform.python_version(),
      **corpus.facts,
      **tokenizer.fingerprint,
      "seq_len": c.seq_len,
      "pipeline": "grain-stream",
      "num_train_docs": n,
      "mean_doc_tokens": round(self.mean_doc_tokens, 3),
      "num_val_docs": docs,
      "num_val_tokens": int(self._val.size),
      "val_bytes": val_bytes,
    }
    self.startup = {"seconds": 0.0, "cached": False}  # set by make()
    self._lock = threading.Lock()
    self._stream = None  # (key, next step, iterator) of the prefetching pipeline

  # ---- train

  def docs_per_step(self, local_rows: int) -> int:
    """K: documents one host reads per step (its rows need local_rows·(seq_len+1) tokens)."""
    return max(1, math.ceil(OVERFILL * local_rows * (self.seq_len + 1) / self.mean_doc_tokens))

  def steps(self, batch_size: int, process_index: int = 0, process_count: int = 1):
    """A Grain MapDataset whose element s is this host's rows of step s (see the module doc)."""
    grain = self._grain
    local = batch_size // process_count
    k = self.docs_per_step(local)
    tok, seq_len = self.tokenizer, self.seq_len
    n = len(self._train_docs)
    # This host's document order: a new permutation each epoch, every P-th document from h.
    # Epochs enough for any run; not infinite: Grain's lengths must fit an index.
    order = grain.MapDataset.range(n).shuffle(seed=self.seed).repeat(2**40 // n)
    order = order[process_index::process_count]
    docs = self._train_docs
    read = docs.many if hasattr(docs, "many") else lambda idx: [docs[i] for i in idx]

    def step_batch(step: int) -> dict:
      texts = read([order[i] for i in range(step * k, (step + 1) * k)])
      return _pack_rows(tok.encode_batch(texts), local, seq_len, tok.eos_id, tok.pad_id)

    return grain.MapDataset.range(len(order) // k).map(step_batch)

  def _iterator(self, steps, start: int):
    grain = self._grain
    ds = steps[start:].to_iter_dataset(
      grain.ReadOptions(num_threads=self._num_threads, prefetch_buffer_size=8)
    )
    return iter(ds)

  def train_batch(
    self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
  ) -> dict:
    """This process's rows of the global batch at `step`: a pure function of the arguments.

    Consecutive steps come from a prefetching iterator; any other step restarts it there.
    """
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    key = (batch_size, process_index, process_count)
    with self._lock:
      if self._stream is None or self._stream[:2] != (key, step):
        it = self._iterator(self.steps(*key), step)
        self._stream = (key, step, it)
      _, _, it = self._stream
      batch = next(it)
      self._stream = (key, step + 1, it)
    return batch

  # ---- eval

  def eval_batches(
    self, batch_size: int, num_batches: int, process_index: int = 0, process_count: int = 1
  ) -> list[dict]:
    """The fixed validation set: windows spread evenly over it; rows past its end have weight 0."""
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
      )
    local = batch_size // process_count
    return packing.eval_batches(
      self._val, self.num_val_windows, batch_size, num_batches, process_index, local,
      self.seq_len, self.tokenizer.pad_id,
    )  # fmt: skip

  def eval_prompts(self, num: int) -> list[tuple[str, str]]:
    raise NotImplementedError(
      f"eval_prompts needs a task with answers (config.data.name='arith'), not {self.name!r}"
    )
