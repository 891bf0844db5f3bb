"""Text generation with a KV cache: python -m keel_jax.sample --workdir=<dir> --prompt="def ".

Prompts are left-padded into one batch; prefill and every decode step run in a
single jitted function whose size does not depend on depth (the cache is stacked
on the scanned `layers` axis).
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from keel_jax.metrics import quiet_libraries
from keel_jax.model import LM, ModelConfig

_PAD_POS = jnp.iinfo(jnp.int32).max  # a position no query ever reaches: hides left padding


def filter_logits(logits_BxV, temperature: float, top_k: int, top_p: float, vocab: int):
  """Logits → scaled log-weights with out-of-vocab, below-top-k and outside-top-p masked."""
  neg = jnp.finfo(jnp.float32).min
  logits_BxV = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, neg)
  logits_BxV = logits_BxV / max(temperature, 1e-6)
  if top_k > 0:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV >= kth_Bx1, logits_BxV, neg)
  if 0.0 < top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    cum_BxV = jnp.cumsum(jax.nn.softmax(sorted_BxV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    cutoff_idx_Bx1 = jnp.sum(cum_BxV < top_p, axis=-1, keepdims=True)
    cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, cutoff_idx_Bx1, axis=-1)
    logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, neg)
  return logits_BxV


def _pick(rng, logits_BxV, temperature, top_k, top_p, vocab):
  if temperature == 0.0:
    masked = jnp.where(jnp.arange(logits_BxV.shape[-1]) < vocab, logits_BxV, -jnp.inf)
    return jnp.argmax(masked, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BxV, temperature, top_k, top_p, vocab)
  return jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _generate(
  cfg, params, tokens_BxP, positions_BxP, max_new, temperature, top_k, top_p, vocab, rng
):
  model = LM(cfg, decode=True)
  b, p = tokens_BxP.shape
  cache = model.init(jax.random.key(0), jnp.zeros((b, p + max_new), jnp.int32))["cache"]
  logits_BxPxV, v = model.apply(
    {"params": params, "cache": cache}, tokens_BxP, positions_BxP, mutable=["cache"]
  )
  next_pos_B = jnp.max(jnp.where(positions_BxP == _PAD_POS, -1, positions_BxP), axis=1) + 1
  rng, sub = jax.random.split(rng)
  first_B = _pick(sub, logits_BxPxV[:, -1], temperature, top_k, top_p, vocab)

  def step(carry, _):
    cache, tok_B, pos_B, rng = carry
    logits_Bx1xV, v = model.apply(
      {"params": params, "cache": cache}, tok_B[:, None], pos_B[:, None], mutable=["cache"]
    )
    rng, sub = jax.random.split(rng)
    nxt_B = _pick(sub, logits_Bx1xV[:, 0], temperature, top_k, top_p, vocab)
    return (v["cache"], nxt_B, pos_B + 1, rng), tok_B

  _, out_NxB = jax.lax.scan(step, (v["cache"], first_B, next_pos_B, rng), None, length=max_new)
  return out_NxB.T


def generate(
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
) -> list[list[int]]:
  """New tokens for each prompt (cut after the first eos_id)."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  p = max(len(x) for x in prompts)
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  positions = np.full((len(prompts), p), _PAD_POS, np.int32)
  for i, x in enumerate(prompts):
    tokens[i, p - len(x) :] = x
    positions[i, p - len(x) :] = np.arange(len(x))
  cfg = ModelConfig.from_dict({**cfg.__dict__, "remat_policy": "none"})  # no grads: no remat
  out = np.asarray(
    _generate(
      cfg,
      params,
      jnp.asarray(tokens),
      jnp.asarray(positions),
      max_new_tokens,
      float(temperature),
      int(top_k),
      float(top_p),
      int(vocab),
      jax.random.key(seed),
    )
  )
  result = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[: row.index(eos_id)]
    result.append(row)
  return result


# ---------------------------------------------------------------- command line

flags.DEFINE_string("workdir", None, "A training workdir (with config.json and checkpoints).")
flags.DEFINE_string("prompt", "def ", "Prompt text.")
flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (overrides --prompt).")
flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  quiet_libraries()
  from keel_jax import restore

  if not FLAGS.workdir:
    sys.exit("error: --workdir is required (a directory written by keel_jax.main)")
  try:
    run = restore.load(FLAGS.workdir, FLAGS.step)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  tok = run.setup.dataset.tokenizer
  if FLAGS.prompts_file:
    with open(FLAGS.prompts_file) as f:
      texts = [line.rstrip("\n") for line in f if line.strip()]
  else:
    texts = [FLAGS.prompt]
  prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
  t0 = time.perf_counter()
  outs = generate(
    run.setup.model_cfg,
    run.params,
    prompts,
    FLAGS.max_new_tokens,
    vocab=tok.vocab_size,
    temperature=FLAGS.temperature,
    top_k=FLAGS.top_k,
    top_p=FLAGS.top_p,
    seed=FLAGS.seed,
    eos_id=tok.eos_id,
    pad_id=tok.pad_id,
  )
  dt = time.perf_counter() - t0
  for text, out in zip(texts, outs, strict=True):
    print(f"--- prompt: {text!r} (step {run.step})")
    print(text + tok.decode(out))
  n = FLAGS.max_new_tokens * len(prompts)
  print(f"--- {n} tokens in {dt:.2f} s incl. compile ({n / dt:,.0f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
