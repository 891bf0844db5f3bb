"""The three kinds of task: multiple choice, last-word prediction and generative exact match.

A task is data (`docs`: a function of data_dir → documents), a prompt format (functions of one
document) and its scoring. `Task.run(model, docs)` returns per-example values of each metric.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from keel_jax.data.tokenizers import utf8_bytes
from keel_jax.tasks import scoring

Doc = dict


@dataclasses.dataclass
class Model:
  """What scoring needs: the model, its parameters and tokenizer, and how to batch."""

  cfg: object  # model.ModelConfig
  params: object
  tokenizer: object
  batch_size: int = 32
  seq_len: int | None = None  # longest input; longer requests lose their oldest context
  mesh: scoring.Mesh | None = None

  def request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (EOS + context, continuation), split as lm-evaluation-harness does.

    Spaces ending the context move to the continuation, and the continuation's ids are those of
    the whole text past the context's ids (SentencePiece merges across the boundary). EOS opens
    the context: training streams separate documents by EOS alone.
    """
    tok = self.tokenizer
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    ctx = tok.encode(context)
    whole = tok.encode(context + continuation)
    cont = whole[len(ctx) :] if whole[: len(ctx)] == ctx else []
    if not cont:  # the boundary merged away: fall back to encoding the parts separately
      cont = tok.encode(continuation)
    return [tok.eos_id] + ctx, cont

  def loglikelihoods(self, pairs: Sequence[tuple[str, str]]):
    requests = [self.request(c, x) for c, x in pairs]
    return scoring.loglikelihoods(
      self.cfg,
      self.params,
      requests,
      batch_size=self.batch_size,
      seq_len=self.seq_len,
      pad_id=self.tokenizer.pad_id,
      mesh=self.mesh,
    )

  def greedy(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    tok = self.tokenizer
    ids = [[tok.eos_id] + tok.encode(p) for p in prompts]
    if self.seq_len is not None:  # keep room for the answer inside the trained window
      keep = max(self.seq_len - max_new_tokens, 1)
      ids = [x[-keep:] for x in ids]
    outs = scoring.greedy(
      self.cfg,
      self.params,
      ids,
      max_new_tokens,
      vocab=tok.vocab_size,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
      batch_size=self.batch_size,
      mesh=self.mesh,
    )
    return [tok.decode(o) for o in outs]


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """Pick the option with the highest log-likelihood of its continuation.

  acc: sum of the continuation's log-probs; acc_norm: that sum divided by the continuation's
  UTF-8 byte length (so tokenizers compare). `options(doc)` gives (context, continuation) per
  choice: usually one context and several continuations; Winogrande varies the context.
  """

  name: str
  docs: Callable[[str | None], Sequence[Doc]]
  options: Callable[[Doc], list[tuple[str, str]]]
  gold: Callable[[Doc], int]
  metrics: tuple[str, ...] = ("acc", "acc_norm")
  primary: str = "acc_norm"

  def run(self, model: Model, docs: Sequence[Doc]) -> dict[str, list[float]]:
    per_doc = [self.options(d) for d in docs]
    golds = [self.gold(d) for d in docs]
    for d, (opts, g) in enumerate(zip(per_doc, golds, strict=True)):
      if not 0 <= g < len(opts):
        raise ValueError(f"{self.name}: document {d} has gold {g} for {len(opts)} options")
    ll_N, _ = model.loglikelihoods([p for opts in per_doc for p in opts])
    out = {"acc": [], "acc_norm": []}
    start = 0
    for opts, g in zip(per_doc, golds, strict=True):
      ll_C = ll_N[start : start + len(opts)]
      start += len(opts)
      bytes_C = np.array([max(len(utf8_bytes(c)), 1) for _, c in opts])
      out["acc"].append(float(np.argmax(ll_C) == g))
      out["acc_norm"].append(float(np.argmax(ll_C / bytes_C) == g))
    return {m: out[m] for m in self.metrics}


@dataclasses.dataclass(frozen=True)
class LastWord:
  """Predict a document's last word: correct when greedy decoding gives exactly its tokens
  (LAMBADA's accuracy). `split(doc)` gives (context, continuation)."""

  name: str
  docs: Callable[[str | None], Sequence[Doc]]
  split: Callable[[Doc], tuple[str, str]]
  metrics: tuple[str, ...] = ("acc",)
  primary: str = "acc"

  def run(self, model: Model, docs: Sequence[Doc]) -> dict[str, list[float]]:
    _, greedy_N = model.loglikelihoods([self.split(d) for d in docs])
    return {"acc": [float(g) for g in greedy_N]}


@dataclasses.dataclass(frozen=True)
class Generative:
  """Greedy decoding through the KV cache, cut at EOS or a stop sequence, answer extracted and
  compared exactly."""

  name: str
  docs: Callable[[str | None], Sequence[Doc]]
  prompt: Callable[[Doc], str]
  answer: Callable[[Doc], str]
  max_new_tokens: int
  stop: tuple[str, ...] = ()
  extract: Callable[[str], str] = str.strip
  metrics: tuple[str, ...] = ("exact_match",)
  primary: str = "exact_match"

  def run(self, model: Model, docs: Sequence[Doc]) -> dict[str, list[float]]:
    texts = model.greedy([self.prompt(d) for d in docs], self.max_new_tokens)
    hits = []
    for text, d in zip(texts, docs, strict=True):
      for s in self.stop:
        text = text.split(s, 1)[0]
      hits.append(float(self.extract(text) == self.answer(d).strip()))
    return {"exact_match": hits}


Task = MultipleChoice | LastWord | Generative


def last_number(text: str) -> str:
  """The last number in `text`, without thousands separators or a trailing period ('' if none)."""
  found = re.findall(r"-?[\d,]*\.?\d+", text)
  return found[-1].replace(",", "").rstrip(".") if found else ""
