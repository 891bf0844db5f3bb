"""`make(config.data)` → a `Dataset`: one path from any source to deterministic packed batches.

source documents → tokenizer → token stream (cached as .npy, keyed by the content fingerprint)
→ fixed windows → `train_batch(step)` / `eval_batches()` (see `packing`). TFDS datasets stream
instead (`streaming`: Grain, nothing pre-tokenized), with the same interface.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import time
import types
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

from keel_jax import paths
from keel_jax.data import packing, sources, streaming, tokenizers

# Every field of config.data with its default; a config may omit any of them.
# The schema and defaults of `config.data` (configs/default.py starts from these).
DEFAULTS = {
  "name": "pycode",  # pycode | kjv | arith | any TFDS text dataset, e.g. lm1b, tiny_shakespeare
  "tokenizer": "byte",  # byte | sentencepiece
  "seq_len": 128,
  "data_dir": "",  # TFDS data_dir ('' → TFDS default); may be gs://
  "cache_dir": "",  # where embedded corpora and tokenizers are prepared ('' → ~/.cache/keel_jax)
  "text_feature": "text",  # TFDS: the feature holding each document's text
  "train_split": "train",  # TFDS: training split (slices like 'train[:10%]' work)
  "eval_split": "",  # TFDS: eval split ('' → validation if the dataset has one, else test)
  "val_fraction": 0.05,  # pycode | kjv | arith: documents held out, chosen by a hash of their key
  # auto: TFDS datasets stream through Grain (read by index, tokenized on the fly), embedded
  # corpora are tokenized once into cache_dir | stream | cache (TFDS too: fine for small sets)
  "pipeline": "auto",
  "num_threads": 4,  # stream: Grain threads computing batches ahead of the trainer
  "max_train_tokens": 0,  # cache: 0 → all; cap on prepared train tokens
  "max_eval_tokens": 2_000_000,  # cap on prepared validation tokens (stream: read at start-up)
  "spm_vocab_size": 8192,  # sentencepiece: pieces, trained on a sample of the train split
  "spm_train_chars": 5_000_000,  # sentencepiece: characters sampled for training
  "spm_model": "",  # sentencepiece: a trained .model to load ('' → train one into cache_dir)
  "arith_steps": 4,  # arith: register updates per problem (the difficulty)
  "arith_num_problems": 100_000,  # arith: problems generated (train + validation)
}
PIPELINES = ("auto", "stream", "cache")
CACHE_FORMAT = 1  # bump when the cached token layout changes
_ENCODE_CHUNK = 128  # documents per tokenizer call (and per check of the token caps)


def _validated(cfg) -> types.SimpleNamespace:
  d = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  unknown = sorted(set(d) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.data keys {unknown}; remove them or check the spelling")
  c = types.SimpleNamespace(**{**DEFAULTS, **d})

  def need(ok, msg):
    if not ok:
      raise ValueError(msg)

  for key in (
    "seq_len",
    "max_train_tokens",
    "max_eval_tokens",
    "spm_vocab_size",
    "spm_train_chars",
    "arith_steps",
    "arith_num_problems",
    "num_threads",
  ):
    v = getattr(c, key)
    need(isinstance(v, int) and not isinstance(v, bool), f"config.data.{key}={v!r} must be an int")
  need(isinstance(c.name, str) and c.name, "config.data.name must be a non-empty string")
  need(
    c.tokenizer in tokenizers.NAMES,
    f"config.data.tokenizer={c.tokenizer!r} is unknown; choose one of {tokenizers.NAMES}",
  )
  need(
    c.pipeline in PIPELINES,
    f"config.data.pipeline={c.pipeline!r} is unknown; choose one of {PIPELINES}",
  )
  need(c.num_threads >= 1, f"config.data.num_threads={c.num_threads} must be >= 1")
  need(c.seq_len >= 2, f"config.data.seq_len={c.seq_len} must be >= 2")
  need(0 < c.val_fraction < 1, f"config.data.val_fraction={c.val_fraction} must be in (0, 1)")
  need(
    c.max_train_tokens >= 0 and c.max_eval_tokens >= 0,
    "config.data.max_train_tokens / max_eval_tokens must be >= 0 (0 → no cap)",
  )
  need(
    c.spm_vocab_size > 260,
    f"config.data.spm_vocab_size={c.spm_vocab_size} must exceed 260 (256 bytes + 4 specials)",
  )
  need(c.spm_train_chars >= 1, "config.data.spm_train_chars must be >= 1")
  need(c.arith_steps >= 1, f"config.data.arith_steps={c.arith_steps} must be >= 1")
  need(
    c.arith_num_problems >= 1, f"config.data.arith_num_problems={c.arith_num_problems} must be >= 1"
  )
  return c


def _key(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _atomic_save(path: str, write) -> None:
  """Writes via a temporary file and a rename: concurrent hosts never see a partial file."""
  tmp = f"{path}.{uuid.uuid4().hex}.tmp"
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def _sample(docs: Sequence[str], max_chars: int) -> Iterator[str]:
  """A fixed pseudo-random sample of ~max_chars of documents: the whole corpus, not its head."""
  n, chars = len(docs), 0
  for start in range(0, n, _ENCODE_CHUNK):
    for i in packing.permute(np.arange(start, min(start + _ENCODE_CHUNK, n)), n, (0,)):
      if chars >= max_chars:
        return
      doc = docs[int(i)]
      chars += len(doc)
      yield doc


def _tokenizer(c, corpus: sources.Corpus, cache_dir: str):
  if c.tokenizer == "byte":
    return tokenizers.ByteTokenizer()
  if c.spm_model:
    return tokenizers.SentencePieceTokenizer.load(paths.resolve(c.spm_model))
  key = _key({"corpus": corpus.facts, "vocab": c.spm_vocab_size, "chars": c.spm_train_chars})
  path = os.path.join(cache_dir, "spm", f"{_safe(c.name)}-{c.spm_vocab_size}-{key}.model")
  if os.path.exists(path):
    return tokenizers.SentencePieceTokenizer.load(path)
  logging.info("training a %d-piece SentencePiece model into %s", c.spm_vocab_size, path)
  sample = _sample(corpus.splits[0], c.spm_train_chars)
  return tokenizers.train_sentencepiece(sample, c.spm_vocab_size, path)


def _encode(tokenizer, docs: Sequence[str], max_tokens: int, dtype) -> tuple[np.ndarray, dict]:
  """Packed token stream of `docs` (stopping once max_tokens is reached) and its counts."""

  def encoded():  # (document, ids), tokenized a chunk at a time
    for start in range(0, len(docs), _ENCODE_CHUNK):
      chunk = docs[start : start + _ENCODE_CHUNK]
      yield from zip(chunk, tokenizer.encode_batch(chunk), strict=True)

  arrays, num_tokens, num_bytes = [], 0, 0
  for doc, ids in encoded():
    if not len(ids):
      continue  # empty documents would only add a lone EOS
    arrays.append(ids)
    num_tokens += len(ids) + 1
    num_bytes += len(tokenizers.utf8_bytes(doc))
    if max_tokens and num_tokens >= max_tokens:
      break
  tokens = packing.pack(arrays, tokenizer.eos_id, dtype)
  return tokens, {"docs": len(arrays), "tokens": int(tokens.size), "bytes": num_bytes}


def _token_streams(c, corpus: sources.Corpus, tokenizer, cache_dir: str):
  """(train tokens, val tokens, counts, cached?) from the cache, or prepared and cached."""
  key = _key(
    {
      "corpus": corpus.facts,
      "tokenizer": tokenizer.fingerprint,
      "format": CACHE_FORMAT,
      "max_train_tokens": c.max_train_tokens,
      "max_eval_tokens": c.max_eval_tokens,
    }
  )
  d = os.path.join(cache_dir, "tokens", f"{_safe(c.name)}-{key}")
  meta_path = os.path.join(d, "meta.json")
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    load = lambda split: np.load(os.path.join(d, f"{split}.npy"), mmap_mode="r")
    return load("train"), load("val"), meta, True

  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  train_docs, val_docs = corpus.splits
  train, train_meta = _encode(tokenizer, train_docs, c.max_train_tokens, dtype)
  val, val_meta = _encode(tokenizer, val_docs, c.max_eval_tokens, dtype)
  meta = {"key": key, "train": train_meta, "val": val_meta}
  os.makedirs(d, exist_ok=True)
  _atomic_save(os.path.join(d, "train.npy"), lambda f: np.save(f, train))
  _atomic_save(os.path.join(d, "val.npy"), lambda f: np.save(f, val))
  # meta.json last: its presence marks a complete cache entry.
  _atomic_save(meta_path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
  return train, val, meta, False


class Dataset:
  """Packed, deterministic train batches and a fixed validation set for one config.data."""

  def __init__(self, c, seed: int, corpus: sources.Corpus, tokenizer, train, val, meta):
    self.name, self.seq_len, self.seed = c.name, c.seq_len, int(seed)
    self.tokenizer = tokenizer
    self._train, self._val, self._corpus = train, val, corpus
    self.num_train_windows = packing.num_windows(train.size, c.seq_len)
    self.num_val_windows = packing.num_windows(val.size, c.seq_len)
    for split, n, size in (
      ("train", self.num_train_windows, train.size),
      ("validation", self.num_val_windows, val.size),
    ):
      if n < 1:
        raise ValueError(
          f"the {split} split of {c.name!r} has {size} tokens, less than one sequence of "
          f"config.data.seq_len + 1 = {c.seq_len + 1}; lower seq_len or use a larger dataset"
        )
    self.bytes_per_token = meta["val"]["bytes"] / meta["val"]["tokens"]
    self.fingerprint = {
      "name": c.name,
      "python": platform.python_version(),
      **corpus.facts,
      **tokenizer.fingerprint,
      "seq_len": c.seq_len,
      "num_train_docs": meta["train"]["docs"],
      "num_val_docs": meta["val"]["docs"],
      "num_train_tokens": meta["train"]["tokens"],
      "num_val_tokens": meta["val"]["tokens"],
      "val_bytes": meta["val"]["bytes"],
      "cache_key": meta["key"],
    }
    self.startup = {"seconds": 0.0, "cached": False}  # set by make()
    self._prompts = None

  def _check(self, batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size < 1 or process_count < 1 or batch_size % process_count:
      raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of process_count={process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
    return batch_size // process_count

  def train_batch(
    self, step: int, batch_size: int, process_index: int = 0, process_count: int = 1
  ) -> dict:
    """This process's rows of the global batch at `step`: a pure function of the arguments."""
    self._check(batch_size, process_index, process_count)
    if step < 0:
      raise ValueError(f"step={step} must be >= 0")
    w_N = packing.train_windows(
      step, batch_size, process_index, process_count, self.num_train_windows, self.seed
    )
    return packing.gather(self._train, w_N, self.seq_len, self.tokenizer.pad_id)

  def eval_batches(
    self, batch_size: int, num_batches: int, process_index: int = 0, process_count: int = 1
  ) -> list[dict]:
    """The fixed validation set: windows spread evenly over it; rows past its end have weight 0."""
    local = self._check(batch_size, process_index, process_count)
    return packing.eval_batches(
      self._val, self.num_val_windows, batch_size, num_batches, process_index, local,
      self.seq_len, self.tokenizer.pad_id,
    )  # fmt: skip

  def eval_prompts(self, num: int) -> list[tuple[str, str]]:
    """(prompt, answer) pairs from the validation split (arith only)."""
    if self._corpus.prompts is None:
      raise NotImplementedError(
        f"eval_prompts needs a task with answers (config.data.name='arith'), not {self.name!r}"
      )
    if self._prompts is None:
      self._prompts = self._corpus.prompts()
    if num > len(self._prompts):
      raise ValueError(
        f"only {len(self._prompts)} validation problems exist; ask for fewer or raise "
        "config.data.arith_num_problems"
      )
    return self._prompts[:num]


def make(cfg, seed: int = 0) -> Dataset:
  """Validates config.data and builds its Dataset (prepared tokens are cached in cache_dir)."""
  t0 = time.perf_counter()
  c = _validated(cfg)
  if not isinstance(seed, int) or seed < 0:
    raise ValueError(f"seed={seed!r} must be an int >= 0 (config.train.seed)")
  if paths.is_remote(c.cache_dir):  # the token cache is memory-mapped
    raise ValueError(
      f"config.data.cache_dir={c.cache_dir!r} must be a local directory (it is memory-mapped)"
    )
  cache_dir = os.path.expanduser(c.cache_dir or "~/.cache/keel_jax")
  corpus = sources.open_corpus(c)
  tokenizer = _tokenizer(c, corpus, cache_dir)
  if c.pipeline == "stream" or (c.pipeline == "auto" and c.name not in sources.BUILTIN):
    ds = streaming.StreamingDataset(c, seed, corpus, tokenizer)
    cached = False
  else:
    train, val, meta, cached = _token_streams(c, corpus, tokenizer, cache_dir)
    ds = Dataset(c, seed, corpus, tokenizer, train, val, meta)
  ds.startup = {"seconds": time.perf_counter() - t0, "cached": cached}
  return ds
