"""Input speed: tokens/s the data pipeline produces beside tokens/s the train step consumes.

  python -m experiments.data_benchmark [--seconds 5] [--c4_docs 4000] [--c4_batch 2] [--skip_default]

Two cases, each on one host:
* default: configs/default.py (pycode, byte tokens, seq 128, batch 16; the cached pipeline);
* c4-like: documents shaped like c4/en (log-normal lengths, median ~1,100 and mean ~2,200
  characters of English prose when the `prose` extra is installed, else Python source), prepared
  here as a TFDS array_record dataset, streamed through Grain with SentencePiece at seq 4096.
The pipeline's rate is consecutive `train_batch` calls (prefetching included); the step's is the
jitted train step of the same config at the same batch shape. The pipeline must never be the
bottleneck: the ratio should be >= 5.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np

from configs import default
from keel_jax import builders, data, steps, train
from keel_jax.data import sources


def pipeline_rate(ds, batch_size: int, seconds: float) -> float:
  """Tokens/s of consecutive train_batch calls for about `seconds` (after one warm-up call)."""
  ds.train_batch(0, batch_size)
  step, t0 = 1, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    ds.train_batch(step, batch_size)
    step += 1
  return (step - 1) * batch_size * ds.seq_len / (time.perf_counter() - t0)


def step_rate(config, ds, num_steps: int = 3) -> float:
  """Tokens/s the jitted train step consumes at this config's batch shape (after compiling)."""
  s = train.setup(config, workdir=None)
  _, shardings, init_fn = builders.abstract_state(s)
  with jax.set_mesh(s.mesh), nn.logical_axis_rules(s.rules):
    state = jax.jit(init_fn, out_shardings=shardings)(jax.random.key(0))
    step_fn = jax.jit(steps.make_train_step(s), donate_argnums=0)
    batch = ds.train_batch(0, config.train.batch_size)
    state, out = step_fn(state, batch)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(num_steps):
      state, out = step_fn(state, batch)
    jax.block_until_ready(out)
  return num_steps * config.train.batch_size * config.data.seq_len / (time.perf_counter() - t0)


def c4_like_docs(num_docs: int, seed: int = 0) -> list[str]:
  """Documents with c4/en-like lengths, cut from English prose (or Python source)."""
  try:
    text = "".join(t for _, t in sources.kjv_chapters(sources._kjv_db_path()))
  except ValueError:  # the prose extra is missing
    text = "".join(t for _, t in sources.pycode_files())
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.lognormal(np.log(1100), 1.0, num_docs).astype(int), 50, 50_000)
  starts = rng.integers(0, len(text) - lengths.max(), num_docs)
  return [text[a : a + n] for a, n in zip(starts, lengths, strict=True)]


def build_tfds(docs: list[str], data_dir: str) -> None:
  """`docs` as a prepared TFDS dataset `c4_like` (array_record; 5% held out for validation)."""
  import tensorflow_datasets as tfds

  class C4Like(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      cut = len(docs) * 19 // 20
      return {
        "train": self._generate_examples(docs[:cut]),
        "validation": self._generate_examples(docs[cut:]),
      }

    def _generate_examples(self, split_docs):
      for i, d in enumerate(split_docs):
        yield i, {"text": d}

  C4Like(data_dir=data_dir, file_format="array_record").download_and_prepare()


def measure(name: str, config, seconds: float) -> dict:
  t0 = time.perf_counter()
  ds = data.make(config.data, seed=0)
  startup = time.perf_counter() - t0
  produced = pipeline_rate(ds, config.train.batch_size, seconds)
  consumed = step_rate(config, ds)
  row = {
    "case": name,
    "pipeline": ds.fingerprint.get("pipeline", "cache"),
    "seq_len": config.data.seq_len,
    "batch": config.train.batch_size,
    "startup_s": startup,
    "pipeline_tokens_per_s": produced,
    "step_tokens_per_s": consumed,
    "ratio": produced / consumed,
  }
  print(
    f"{name}: {row['pipeline']} pipeline {produced:,.0f} tokens/s, train step {consumed:,.0f} "
    f"tokens/s, ratio {row['ratio']:.1f}x (seq {row['seq_len']}, batch {row['batch']}, "
    f"start-up {startup:.1f} s)",
    flush=True,
  )
  return row


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seconds", type=float, default=5.0, help="how long to time the pipeline")
  p.add_argument("--c4_docs", type=int, default=4000, help="c4-like documents to prepare")
  p.add_argument("--c4_batch", type=int, default=2, help="batch size of the c4-like case")
  p.add_argument("--c4_seq_len", type=int, default=4096, help="sequence length of the c4-like case")
  p.add_argument("--c4_vocab", type=int, default=8192, help="SentencePiece pieces (c4-like)")
  p.add_argument("--skip_default", action="store_true")
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if not args.skip_default:
      c = default.get_config()
      c.data.cache_dir = os.path.join(tmp, "cache")
      rows.append(measure("default", c, args.seconds))

    build_tfds(c4_like_docs(args.c4_docs), os.path.join(tmp, "tfds"))
    c = default.get_config()
    c.data.update(
      name="c4_like",
      data_dir=os.path.join(tmp, "tfds"),
      cache_dir=os.path.join(tmp, "cache"),
      tokenizer="sentencepiece",
      spm_train_chars=2_000_000,
      spm_vocab_size=args.c4_vocab,
      seq_len=args.c4_seq_len,
      max_eval_tokens=100_000,
    )
    c.train.batch_size = args.c4_batch
    rows.append(measure("c4-like", c, args.seconds))
  return rows


if __name__ == "__main__":
  main()
