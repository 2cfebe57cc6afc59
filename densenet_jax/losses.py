"""The training loss: the one definition the summary, the tests and the trainer share."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy of integer `labels`, in float32; take the mean yourself.

  With `label_smoothing` a, the target puts 1 - a + a/K on the label and a/K on each of the K
  classes (optax.smooth_labels), so the loss is (1 - a) * NLL - a * mean(log p).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if label_smoothing == 0.0:
    return nll
  return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
