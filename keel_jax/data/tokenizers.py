"""Tokenizers: byte-level (no files) and SentencePiece (trained locally or loaded).

Both share one small interface: `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(str)`,
`encode_batch(texts)` (numpy, for whole corpora), `decode(ids)` and a JSON `fingerprint`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence

import numpy as np

from keel_jax import paths  # local or gs://

NAMES = ("byte", "sentencepiece")
RUN_FILE = "tokenizer.model"  # a SentencePiece run's model, kept in its workdir by the trainer


def utf8_bytes(text: str) -> bytes:
  """UTF-8 bytes of `text`; lone surrogates from `surrogateescape` become their raw bytes."""
  try:
    return text.encode("utf-8", "surrogateescape")
  except UnicodeEncodeError:  # other lone surrogates cannot be bytes: replace them
    return text.encode("utf-8", "replace")


def _valid_utf8(text: str) -> str:
  """`text` with lone surrogates (which SentencePiece cannot take) replaced by U+FFFD."""
  try:
    text.encode("utf-8")
    return text
  except UnicodeEncodeError:
    return utf8_bytes(text).decode("utf-8", "replace")


class ByteTokenizer:
  """UTF-8 bytes shifted past three special ids: PAD=0, BOS=1, EOS=2, byte b → b + 3."""

  name = "byte"
  pad_id, bos_id, eos_id = 0, 1, 2
  offset = 3
  vocab_size = 256 + offset

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0].tolist()

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(utf8_bytes(t), np.uint8).astype(np.int32) + self.offset for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Drops special and out-of-vocabulary ids; invalid UTF-8 becomes U+FFFD, never an error."""
    ids_N = np.asarray(ids if hasattr(ids, "__len__") else list(ids), np.int64).reshape(-1)
    ids_N = ids_N[(ids_N >= self.offset) & (ids_N < self.vocab_size)]
    return (ids_N - self.offset).astype(np.uint8).tobytes().decode("utf-8", "replace")

  @property
  def fingerprint(self) -> dict:
    return {"tokenizer": self.name, "vocab_size": self.vocab_size}


class SentencePieceTokenizer:
  """A SentencePiece model (serialized proto); ids outside the vocabulary decode to nothing."""

  name = "sentencepiece"

  def __init__(self, model_proto: bytes):
    import sentencepiece as spm

    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._sha = hashlib.sha256(model_proto).hexdigest()
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    self.bos_id = int(self._sp.bos_id())
    if self.eos_id < 0:
      raise ValueError("the SentencePiece model has no EOS piece; train it with eos_id >= 0")
    # Padding carries weight 0, so any valid id serves when the model defines no PAD piece.
    pad = int(self._sp.pad_id())
    self.pad_id = pad if pad >= 0 else int(self._sp.unk_id())

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    if not paths.exists(path):
      raise ValueError(f"config.data.spm_model={path!r} does not exist; give a .model file path")
    return cls(paths.read_bytes(path))

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(_valid_utf8(text)))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    ids = self._sp.encode([_valid_utf8(t) for t in texts], num_threads=2)
    return [np.asarray(i, np.int32) for i in ids]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  @property
  def fingerprint(self) -> dict:
    return {"tokenizer": self.name, "vocab_size": self.vocab_size, "spm_sha256": self._sha[:16]}


def train_sentencepiece(texts: Iterable[str], vocab_size: int, path: str) -> SentencePieceTokenizer:
  """Trains a byte-fallback BPE model on `texts` (split into lines) and writes it to `path`.

  Normalization is off and whitespace is kept verbatim, so decode(encode(s)) == s for any text
  (code indentation included); characters outside the vocabulary fall back to byte pieces.
  """
  import sentencepiece as spm

  def lines():
    for text in texts:
      for line in text.split("\n"):
        if line.strip():
          yield line

  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with tempfile.TemporaryDirectory(dir=os.path.dirname(path) or ".") as tmp:
    prefix = os.path.join(tmp, "spm")
    try:
      spm.SentencePieceTrainer.train(
        sentence_iterator=lines(),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        num_threads=2,
        minloglevel=2,  # quiet: training logs go to stderr by default
      )
    except RuntimeError as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise ValueError(
        f"SentencePiece training failed ({first}); lower config.data.spm_vocab_size or raise "
        "config.data.spm_train_chars"
      ) from None
    os.replace(prefix + ".model", path)  # atomic: concurrent hosts never read a partial file
  with open(path, "rb") as f:
    return SentencePieceTokenizer(f.read())
