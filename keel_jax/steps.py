"""The jitted functions of training: the train step (gradient accumulation, NaN policy,
diagnostics), the eval step and the eval metrics over a fixed set of batches."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from keel_jax import loss
from keel_jax.builders import Setup
from keel_jax.model import LM, sublayer_norms


def make_train_step(s: Setup):
  model, t = LM(s.model_cfg), s.config.train
  accum = t.grad_accum_steps

  def loss_fn(params, batch, count):
    logits = model.apply({"params": params}, batch["inputs"])
    total, nll, _ = loss.cross_entropy(logits, batch["targets"], batch["weights"], t.z_loss)
    # Divided before differentiating, so the gradients come out normalized: dividing them
    # after would hold a second parameter-sized buffer.
    return total / count, nll

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]
    # Sums over tokens, normalized once by the whole batch's count: accumulation equals one
    # big batch.
    count = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    if accum == 1:
      (_, nll), grads = grad_fn(params, batch, count)
    else:
      # Strided micro-batches: every data shard holds a slice of each one.
      micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
      )

      def body(carry, mb):
        (_, nll), grads = grad_fn(params, mb, count)
        return jax.tree.map(jnp.add, carry, (grads, nll)), None

      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros(()))
      (grads, nll), _ = jax.lax.scan(body, zeros, micro)
    loss_value = nll / count
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = s.tx.update(grads, state["opt_state"], params)
    new = {
      "step": state["step"] + 1,
      "params": optax.apply_updates(params, updates),
      "opt_state": opt_state,
    }
    finite = jnp.isfinite(loss_value) & jnp.isfinite(grad_norm)
    if t.nonfinite == "skip":
      kept = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
      new = {**kept, "step": state["step"] + 1}
    out = {
      "train/loss": loss_value,
      "train/grad_norm": grad_norm,
      # The new parameters, not the old: a read of the old ones that the update does not wait
      # for makes XLA copy every donated parameter (so there is no update norm either).
      "train/param_norm": optax.tree.norm(new["params"]),
      "train/learning_rate": s.schedule(state["step"]),
      "train/tokens": count,
      "finite": finite,
    }
    if t.diag_every:
      out["diag/grad_norm_per_sublayer"] = sublayer_norms(grads)
      out["diag/grad_rms_per_sublayer"] = sublayer_norms(grads, rms=True)
      out["diag/param_rms_per_sublayer"] = sublayer_norms(new["params"], rms=True)
    return new, out

  return step


def make_eval_step(s: Setup):
  model = LM(s.model_cfg)

  def step(params, batch):
    logits = model.apply({"params": params}, batch["inputs"])
    _, nll, count = loss.cross_entropy(logits, batch["targets"], batch["weights"])
    return nll, count

  return step


def evaluate(eval_fn, params, batches, bytes_per_token: float) -> dict:
  """Loss, perplexity and bits per byte over `batches` (token-weighted, as one big batch)."""
  nll, count = 0.0, 0.0
  for b in batches:
    n, c = jax.device_get(eval_fn(params, b))
    nll, count = nll + float(n), count + float(c)
  loss_value = nll / max(count, 1.0)
  return {
    "eval/loss": loss_value,
    "eval/perplexity": math.exp(min(loss_value, 50.0)),
    "eval/bits_per_byte": loss_value / math.log(2) / bytes_per_token,
  }
