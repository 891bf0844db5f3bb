"""Every task by name: the offline `arith` and the TFDS benchmarks of the paper's Table 3 kind.

Prompts follow lm-evaluation-harness's zero-shot formats. TFDS datasets are read with
`tfds.data_source` (array_record, no TensorFlow) and are never downloaded here: an unprepared
one fails at once, naming the `tfds build` command that prepares it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Sequence

import numpy as np

from keel_jax.data import arith, sources
from keel_jax.tasks.kinds import Generative, LastWord, MultipleChoice, Task, last_number

# ---------------------------------------------------------------- reading TFDS


def plain(x):
  """A TFDS record as Python values: bytes → str, arrays → lists, numpy scalars → numbers."""
  if isinstance(x, dict):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, bytes):
    return x.decode("utf-8", "replace")
  if isinstance(x, np.ndarray):
    return [plain(v) for v in x.tolist()] if x.ndim else plain(x.item())
  if isinstance(x, list | tuple):
    return [plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def _builder(name: str, data_dir: str | None):
  """The dataset's builder, or, when its code cannot load here (super_glue needs TensorFlow),
  the read-only builder of a prepared copy; None when neither exists."""
  import tensorflow_datasets as tfds

  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    import tensorflow_datasets.text  # noqa: F401  (legacy builders register on import)

    try:
      return tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ModuleNotFoundError):
      pass
  except ModuleNotFoundError:
    pass
  try:
    return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
  except Exception:  # noqa: BLE001  (any failure here means: not prepared)
    return None


@contextlib.contextmanager
def _quiet():
  """TFDS warns on stderr while it looks for a dataset; the error raised says it in one line."""
  from absl import logging

  old = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(old)


def tfds_docs(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
  """Random-access records of a prepared TFDS split; ValueError with the build command if not."""
  with _quiet():
    return _tfds_docs(name, split, data_dir)


def _tfds_docs(name: str, split: str, data_dir: str | None) -> Sequence[dict]:
  data_dir = data_dir or None
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  build = f"tfds build {name} --file_format=array_record"
  if data_dir:
    build += f" --data_dir={data_dir}"
  not_prepared = (
    f"TFDS dataset {name!r} is not prepared in {where}; prepare it once on a machine with "
    f"network: {build} (or pass --data_dir / config.data.data_dir of a prepared copy)"
  )
  b = _builder(name, data_dir)
  if b is None:
    raise ValueError(not_prepared)
  try:
    source = b.as_data_source(split=split)
  except (NotImplementedError, AssertionError, FileNotFoundError) as e:
    if not b.is_prepared():
      raise ValueError(not_prepared) from None
    raise ValueError(
      f"TFDS dataset {name!r} in {where} cannot be read by tfds.data_source "
      f"({type(e).__name__}); re-prepare it as array_record: {build}"
    ) from None
  return _Records(source)


class _Records(Sequence):
  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    return plain(self._source[i])


def from_tfds(name: str, split: str):
  return functools.partial(tfds_docs, name, split)


# ---------------------------------------------------------------- arith (offline)


def arith_docs(num: int = 1000, steps: int = 4, val_fraction: float = 0.05, seed: int = 1):
  """`num` arith problems that no `arith` training run has seen.

  They are drawn from their own seed and kept only if the training corpus's hash split would
  put them in validation: unseen by any run whose config.data.val_fraction >= val_fraction.
  """
  out: list[dict] = []
  batch = 20 * num
  while len(out) < num:
    for q, a in arith.generate(batch, steps, seed):
      if sources.held_out(q, val_fraction):
        out.append({"prompt": q, "answer": a})
    seed, batch = seed + 1000, batch * 2
  return out[:num]


def arith_task(name="arith", num=1000, steps=4, val_fraction=0.05) -> Generative:
  """The arith task at a difficulty: `steps` updates per problem (a run's arith_steps)."""
  cached = functools.cache(lambda: arith_docs(num, steps, val_fraction))
  return Generative(
    name=name,
    docs=lambda data_dir: cached(),
    prompt=lambda d: d["prompt"],
    answer=lambda d: d["answer"],
    max_new_tokens=2,  # one digit, then EOS: a model that keeps going is wrong
  )


# ---------------------------------------------------------------- the TFDS benchmarks


def _arc(name: str, config: str) -> MultipleChoice:
  return MultipleChoice(
    name=name,
    docs=from_tfds(f"ai2_arc/{config}", "test"),
    options=lambda d: [
      (f"Question: {d['question']}\nAnswer:", f" {t}") for t in d["choices"]["text"]
    ],
    gold=lambda d: d["choices"]["label"].index(d["answerKey"]),
  )


def _hellaswag_clean(text: str) -> str:
  """WikiHow artefacts out: ' [title]' → '. ', other [tags] and double spaces removed."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def _winogrande_options(d) -> list[tuple[str, str]]:
  """Partial scoring: each option fills the blank in the context; the rest is the continuation."""
  i = d["sentence"].index("_")
  rest = " " + d["sentence"][i + 1 :].strip()
  return [(d["sentence"][:i] + d[o], rest) for o in ("option1", "option2")]


def _lambada_split(d) -> tuple[str, str]:
  context, word = d["passage"].rstrip().rsplit(" ", 1)
  return context, " " + word


TASK_LIST: tuple[Task, ...] = (
  arith_task(),
  _arc("arc_easy", "ARC-Easy"),
  _arc("arc_challenge", "ARC-Challenge"),
  MultipleChoice(
    name="piqa",
    docs=from_tfds("piqa", "validation"),
    options=lambda d: [(f"Question: {d['goal']}\nAnswer:", f" {d[s]}") for s in ("sol1", "sol2")],
    gold=lambda d: d["label"],
  ),
  MultipleChoice(
    name="hellaswag",
    docs=from_tfds("hellaswag", "validation"),
    options=lambda d: [
      (_hellaswag_clean(f"{d['activity_label']}: {d['context']}"), " " + _hellaswag_clean(e))
      for e in d["endings"]
    ],
    gold=lambda d: d["label"],
  ),
  MultipleChoice(
    name="winogrande",
    docs=from_tfds("winogrande", "validation"),
    options=_winogrande_options,
    gold=lambda d: d["label"],
    metrics=("acc",),  # the continuation is shared: acc_norm would equal acc
    primary="acc",
  ),
  MultipleChoice(
    name="openbookqa",
    docs=from_tfds("openbookqa", "test"),
    options=lambda d: [(d["question"]["stem"], f" {d['question'][f'choice_{c}']}") for c in "ABCD"],
    gold=lambda d: d["answerKey"],
  ),
  MultipleChoice(
    name="boolq",
    docs=from_tfds("super_glue/boolq", "validation"),
    options=lambda d: [
      (f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", f" {a}") for a in ("no", "yes")
    ],
    gold=lambda d: d["label"],  # 1 = True
    metrics=("acc",),
    primary="acc",
  ),
  LastWord(name="lambada", docs=from_tfds("lambada", "test"), split=_lambada_split),
  Generative(
    name="gsm8k",
    docs=from_tfds("gsm8k", "test"),
    prompt=lambda d: f"Question: {d['question']}\nAnswer:",
    answer=lambda d: d["short_answer"].replace(",", "").strip(),
    max_new_tokens=256,
    stop=("\n\n", "Question:"),
    extract=last_number,
  ),
)
TASKS: dict[str, Task] = {t.name: t for t in TASK_LIST}
