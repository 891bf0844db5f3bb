"""Token-level cross-entropy with padding weights and optional z-loss."""

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT, z_loss: float = 0.0):
  """Returns (sum of weighted per-token loss incl. z-loss, sum of weighted nll, sum of weights)."""
  logits_BxTxV = logits_BxTxV.astype(jnp.float32)
  log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
  target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
  nll_BxT = log_z_BxT - target_logit_BxT
  # z-loss keeps log Z near 0 so the fp32 softmax never drifts to huge logits.
  total_BxT = nll_BxT + z_loss * jnp.square(log_z_BxT)
  return jnp.sum(total_BxT * weights_BxT), jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)
