"""Text generation with a KV cache: python -m keel_jax.sample --workdir=<dir> --prompt="def ".

Prompts are left-padded into one batch. `prefill` runs them through the model once and fills
the cache; `decode_step` appends one token per row. Generation is two jitted functions, the
prefill and a `lax.scan` of decode steps; the cache is stacked on the scanned `layers` axis,
so the compiled step does not grow with depth. Sampling settings (temperature, top-k, top-p)
are traced values: changing them never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from keel_jax import checkpoint, paths, restore
from keel_jax.layers import append_to_cache
from keel_jax.metrics import quiet_libraries
from keel_jax.model import LM, ModelConfig

PAD_POS = int(jnp.iinfo(jnp.int32).max)  # a position no query reaches: hides left padding


def encode_prompt(tokenizer, text: str) -> list[int]:
  """A prompt's ids, opened the way every training document is.

  Training streams separate documents by EOS alone (`data.packing.pack`): EOS is the
  start-of-document context the model has learned, while BOS never occurs in training.
  """
  return [tokenizer.eos_id] + tokenizer.encode(text)


# ---------------------------------------------------------------- the model with a cache


def prefill(cfg: ModelConfig, params, tokens_BxP, positions_BxP, length: int):
  """Prompts → (logits [B, P, V], a cache of `length` slots holding their keys and values)."""
  model = LM(cfg, decode=True)
  # init only allocates the cache (empty slots at PAD_POS); under jit its parameter
  # initialization is dead code and is removed.
  shape_BxS = (tokens_BxP.shape[0], length)
  cache = model.init(jax.random.key(0), jnp.zeros(shape_BxS, jnp.int32))["cache"]
  logits_BxPxV, v = model.apply(
    {"params": params, "cache": cache}, tokens_BxP, positions_BxP, mutable=["cache_new"]
  )
  return logits_BxPxV, append_to_cache(cache, v["cache_new"])


def decode_step(cfg: ModelConfig, params, cache, tokens_B, positions_B):
  """One token per row at `positions_B`, attending to the cache → (logits [B, V], cache)."""
  logits_Bx1xV, v = LM(cfg, decode=True).apply(
    {"params": params, "cache": cache},
    tokens_B[:, None],
    positions_B[:, None],
    mutable=["cache_new"],
  )
  return logits_Bx1xV[:, 0], append_to_cache(cache, v["cache_new"])


# ---------------------------------------------------------------- choosing tokens


def filter_logits(logits_BxV, temperature, top_k, top_p, vocab):
  """Log-weights to sample from: logits / temperature, with -inf for ids >= vocab (the head's
  padding, never a real token), outside the top-k, or outside the top-p nucleus.

  The nucleus is the fewest most likely tokens whose mass reaches top_p; tokens tied with its
  last one are kept too. Every argument may be traced.
  """
  v = logits_BxV.shape[-1]
  rank_V = jnp.arange(v)
  x_BxV = logits_BxV.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  x_BxV = jnp.where(rank_V < vocab, x_BxV, -jnp.inf)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  desc_BxV = jnp.where(rank_V < k, -jnp.sort(-x_BxV, axis=-1), -jnp.inf)
  cum_BxV = jnp.cumsum(jax.nn.softmax(desc_BxV, axis=-1), axis=-1)
  # Tokens before the one that reaches top_p, plus that one; top_p = 1 keeps all (the mass
  # may round to just under 1).
  n_B = jnp.minimum(jnp.sum(cum_BxV < top_p, axis=-1) + 1, k)
  n_B = jnp.where(top_p >= 1.0, k, n_B)
  cutoff_Bx1 = jnp.take_along_axis(desc_BxV, n_B[:, None] - 1, axis=-1)
  return jnp.where(x_BxV >= cutoff_Bx1, x_BxV, -jnp.inf)


def pick(rng, logits_BxV, settings: dict):
  """Next token per row: argmax when settings["temperature"] == 0, else a filtered sample."""
  t, vocab = settings["temperature"], settings["vocab"]
  greedy_B = jnp.argmax(
    jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf), -1
  )
  filtered_BxV = filter_logits(logits_BxV, t, settings["top_k"], settings["top_p"], vocab)
  sampled_B = jax.random.categorical(rng, filtered_BxV, axis=-1)
  return jnp.where(t > 0, sampled_B, greedy_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "length"))
def _prefill(cfg, params, tokens_BxP, positions_BxP, settings, rng, *, length):
  logits_BxPxV, cache = prefill(cfg, params, tokens_BxP, positions_BxP, length)
  first_B = pick(rng, logits_BxPxV[:, -1], settings)
  next_pos_B = jnp.max(jnp.where(positions_BxP == PAD_POS, -1, positions_BxP), axis=1) + 1
  return cache, first_B, next_pos_B


@functools.partial(jax.jit, static_argnames=("cfg", "steps"), donate_argnames=("cache",))
def _decode(cfg, params, cache, tok_B, pos_B, settings, rng, *, steps):
  def step(carry, rng_t):
    cache, tok_B, pos_B = carry
    logits_BxV, cache = decode_step(cfg, params, cache, tok_B, pos_B)
    nxt_B = pick(rng_t, logits_BxV, settings)
    return (cache, nxt_B, pos_B + 1), nxt_B

  (cache, _, _), out_NxB = jax.lax.scan(step, (cache, tok_B, pos_B), jax.random.split(rng, steps))
  # Returning the cache lets it alias the donated input: the loop updates it in place
  # instead of copying it first.
  return out_NxB.T, cache


# ---------------------------------------------------------------- generation


@dataclasses.dataclass
class Stats:
  """Where a `generate` call spent its time (compile_s is ~0 once compiled)."""

  compile_s: float  # tracing, lowering and compiling prefill and decode
  prefill_s: float
  decode_s: float
  prompt_tokens: int  # batch × padded prompt length
  decode_tokens: int  # batch × decode steps (the first new token comes from the prefill)

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decode_tokens / max(self.decode_s, 1e-9)

  def summary(self) -> str:
    return (
      f"compile {self.compile_s:.2f} s | prefill {self.prompt_tokens} tokens in "
      f"{1e3 * self.prefill_s:.1f} ms | decode {self.decode_tokens} tokens in "
      f"{self.decode_s:.3f} s: {self.decode_tokens_per_s:,.0f} tokens/s"
    )


def check_settings(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """Raises ValueError with one line for an impossible generation setting."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not temperature >= 0:  # also catches NaN
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 = no limit)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")


def generate_with_stats(
  cfg: ModelConfig,
  params,
  prompts: list[list[int]],
  max_new_tokens: int,
  *,
  vocab: int,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | None = None,
  pad_id: int = 0,
  pad_to: int = 0,
) -> tuple[list[list[int]], Stats]:
  """`generate`, and the time spent compiling, prefilling and decoding."""
  check_settings(max_new_tokens, temperature, top_k, top_p)
  if not 1 <= vocab <= cfg.vocab_size:
    raise ValueError(f"vocab={vocab} must be in [1, model vocab_size={cfg.vocab_size}]")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if any(not 0 <= i < vocab for p in prompts for i in p):
    raise ValueError(f"prompt token ids must be in [0, {vocab})")

  # Padding every call to one prompt length (pad_to) lets batches of any prompts share a compile.
  b, p = len(prompts), max(pad_to, *(len(x) for x in prompts))
  tokens = np.full((b, p), pad_id, np.int32)
  positions = np.full((b, p), PAD_POS, np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x) :] = x
    positions[i, p - len(x) :] = np.arange(len(x))
  settings = {
    "temperature": np.float32(temperature),
    "top_k": np.int32(top_k),
    "top_p": np.float32(top_p),
    "vocab": np.int32(vocab),
  }
  rng_prefill, rng_decode = jax.random.split(jax.random.key(seed))
  steps = max_new_tokens - 1
  cfg = dataclasses.replace(cfg, remat_policy="none")  # no gradients: nothing to rematerialize

  t0 = time.perf_counter()
  prefill_args = (params, tokens, positions, settings, rng_prefill)
  prefill_fn = _prefill.lower(cfg, *prefill_args, length=p + steps).compile()
  if steps:
    # The prefill's outputs with their shardings: decode compiles for exactly what it gets.
    decode_args = (params, *prefill_fn.out_info, settings, rng_decode)
    decode_fn = _decode.lower(cfg, *decode_args, steps=steps).compile()
  t1 = time.perf_counter()
  cache, first_B, next_pos_B = jax.block_until_ready(prefill_fn(*prefill_args))
  t2 = time.perf_counter()
  out_BxN = first_B[:, None]
  if steps:
    rest_BxN, _ = decode_fn(params, cache, first_B, next_pos_B, settings, rng_decode)
    out_BxN = jnp.concatenate([out_BxN, jax.block_until_ready(rest_BxN)], axis=1)
  t3 = time.perf_counter()

  result = []
  if not out_BxN.is_fully_addressable:  # rows decoded on other hosts: every host gets all of them
    out_BxN = multihost_utils.process_allgather(out_BxN, tiled=True)
  for row in np.asarray(out_BxN).tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id)]
    result.append(row)
  return result, Stats(t1 - t0, t2 - t1, t3 - t2, b * p, b * steps)


def generate(cfg: ModelConfig, params, prompts: list[list[int]], max_new_tokens: int, **kwargs):
  """`max_new_tokens` new ids per prompt, cut before the first eos_id.

  Keywords: vocab (required: the tokenizer's size; larger ids are never emitted),
  temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, eos_id, pad_id, pad_to
  (left-pad prompts to at least this length: one compile for batches of different prompts).
  """
  return generate_with_stats(cfg, params, prompts, max_new_tokens, **kwargs)[0]


# ---------------------------------------------------------------- command line

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command line's flags, defined only when it runs: modules that import this one
  (the trainer imports `sample`) have flags of their own."""
  flags.DEFINE_string("workdir", None, "A training workdir (with config.json and checkpoints).")
  flags.DEFINE_string("prompt", "def ", "Prompt text.")
  flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (overrides --prompt).")
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
  flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")


def _read_prompts() -> list[str]:
  if not FLAGS.prompts_file:
    return [FLAGS.prompt]
  try:
    texts = [line for line in paths.read_text(FLAGS.prompts_file).split("\n") if line.strip()]
  except OSError as e:
    raise ValueError(f"cannot read --prompts_file: {e}") from e
  if not texts:
    raise ValueError(f"--prompts_file={FLAGS.prompts_file!r} has no non-empty line")
  return texts


def main(argv):
  del argv
  quiet_libraries()
  try:
    if not FLAGS.workdir:
      raise ValueError("--workdir is required (a directory written by keel_jax.main)")
    check_settings(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    texts = _read_prompts()
    run = restore.load(FLAGS.workdir, FLAGS.step)
    tok = run.setup.tokenizer
    outs, stats = generate_with_stats(
      run.setup.model_cfg,
      run.params,
      [encode_prompt(tok, t) for t in texts],
      FLAGS.max_new_tokens,
      vocab=tok.vocab_size,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      seed=FLAGS.seed,
      eos_id=tok.eos_id,
      pad_id=tok.pad_id,
    )
  except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  for text, out in zip(texts, outs, strict=True):
    print(f"--- prompt {text!r} (step {run.step})")
    print(text + tok.decode(out), flush=True)
  print(f"--- {stats.summary()}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
