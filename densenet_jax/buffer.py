"""The dense block as one buffer: each map written once, read as a prefix, its gradient summed in place.

A textbook dense block concatenates every earlier map again for each layer, and its autodiff
gathers each map's gradient from a slice of every later layer's input gradient. Here the block
input and each layer's k new channels are written once into a buffer of the block's final
width, at their channel offset; layer l reads its input as the prefix of the first m0 + l*k
channels (later layers only write higher channels). On a TPU, whose channel (lane) dimension
is padded to 128, packed narrow maps also share lane tiles instead of each filling one.

The backward pass is a `jax.custom_vjp` that walks the layers in reverse: from the block's
final buffer (every layer's input is a prefix of it) it recomputes norm1-act of each prefix
(Pleiss et al. 2017, so memory stays linear in depth), and adds each layer's input gradient into
the prefix of one gradient buffer in place. Each layer's bottleneck output is kept for the
backward pass unless `memory_efficient`, which recomputes it too. Per-map BatchNorm moments
(`layers.DenseFeatures`) live in a second, (2, C) buffer that is handled the same way.

The layers are the model's own `DenseLayer` modules, applied functionally: any norm, conv,
activation, dropout and `bn_axis_name` compute exactly what the concatenating block computes
(tests/reference_test.py, tests/buffer_test.py).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from densenet_jax.layers import DenseFeatures, batch_moments

Array = jax.Array


def _apply(layer: nn.Module, method: Callable[..., Array], variables: Any, x: Any,
           train: bool, mutable: bool, rng: Array | None) -> tuple[Array, Any]:
  """`layer.method(x, train)` on `variables`: its output and its updated batch statistics."""
  rngs = {} if rng is None else {"dropout": rng}
  if not mutable:
    return layer.apply(variables, x, train, method=method, rngs=rngs), {}
  y, updates = layer.apply(variables, x, train, method=method, rngs=rngs,
                           mutable=["batch_stats"])
  return y, updates.get("batch_stats", {})


def dense_block(layers: Sequence[nn.Module], x: Array, variables: Sequence[Any],
                rngs: Sequence[Array | None], train: bool, mutable: bool, shared_moments: bool,
                keep_bottlenecks: bool) -> tuple[Array, list[Any]]:
  """The output of a dense block of `layers` (unbound `DenseLayer`s) on `x`, and each layer's
  updated batch statistics (empty where `mutable` is False).

  Args:
    layers: the block's layers, each with its `variables` (all collections) and dropout `rngs`.
    train: training mode (batch statistics, dropout).
    mutable: return the updated batch statistics (training with a mutable 'batch_stats').
    shared_moments: compute each map's BatchNorm moments once (`layers.DenseFeatures`).
    keep_bottlenecks: keep each layer's `head` output for the backward pass (else recompute it).
  """
  c0 = x.shape[-1]
  growth = [layer.growth_rate for layer in layers]
  offsets = [c0 + sum(growth[:i]) for i in range(len(layers) + 1)]

  def channels(a: Array | None, lo: int, hi: int) -> Array | None:
    return None if a is None else jax.lax.slice_in_dim(a, lo, hi, axis=-1)

  def features(prefix: Array, prefix_moments: Array | None) -> DenseFeatures:
    return DenseFeatures((prefix,), None if prefix_moments is None else (prefix_moments,))

  def head(i: int, v: Any, feats: DenseFeatures, rng: Array | None) -> tuple[Array, Any]:
    return _apply(layers[i], type(layers[i]).head, v, feats, train, mutable, rng)

  def tail(i: int, v: Any, z: Array, rng: Array | None) -> tuple[Array, Any]:
    return _apply(layers[i], type(layers[i]).tail, v, z, train, mutable, rng)

  def forward(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, offsets[-1] - c0)])
    moments = None
    if shared_moments:
      moments = jnp.pad(batch_moments(x), [(0, 0), (0, offsets[-1] - c0)])
    bottlenecks, stats = [], []  # head outputs; each layer's updated statistics
    for i in range(len(layers)):
      feats = features(channels(buf, 0, offsets[i]), channels(moments, 0, offsets[i]))
      z, head_stats = head(i, variables[i], feats, rngs[i])
      # the tail starts from the head's updated statistics and returns all of the layer's
      y, layer_stats = tail(i, {**variables[i], "batch_stats": head_stats} if mutable
                            else variables[i], z, rngs[i])
      buf = jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), offsets[i], axis=-1)
      if moments is not None:
        moments = jax.lax.dynamic_update_slice_in_dim(moments, batch_moments(y), offsets[i],
                                                      axis=-1)
      bottlenecks.append(z)
      stats.append(layer_stats)
    return buf, moments, bottlenecks, stats

  @jax.custom_vjp
  def block(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf, _, _, stats = forward(x, variables, rngs)
    return buf, stats

  def block_fwd(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf, moments, bottlenecks, stats = forward(x, variables, rngs)
    # A basic layer's head output is its map, already in the buffer.
    saved = bottlenecks if keep_bottlenecks and layers[0].bn_size is not None else None
    return (buf, stats), (buf, moments, saved, variables, rngs)

  def block_bwd(residuals: Any, cotangents: Any):
    buf, moments, saved, variables, rngs = residuals
    grad, _ = cotangents  # the statistics are not differentiable (stop_gradient below)
    grad_moments = None if moments is None else jnp.zeros_like(moments)
    grad_variables = [None] * len(layers)

    def map_grad(lo: int, hi: int) -> Array:
      """The whole gradient of channels [lo, hi): as read, and through their moments."""
      g = channels(grad, lo, hi)
      if moments is None:
        return g
      _, moments_vjp = jax.vjp(batch_moments, channels(buf, lo, hi))
      return g + moments_vjp(channels(grad_moments, lo, hi))[0]

    for i in reversed(range(len(layers))):
      lo, hi = offsets[i], offsets[i + 1]
      gy = map_grad(lo, hi)

      def head_output(v: Any, prefix: Array, prefix_moments: Array | None, i: int = i) -> Array:
        return head(i, v, features(prefix, prefix_moments), rngs[i])[0]

      grad_tail = None
      if saved is not None:
        _, tail_vjp = jax.vjp(lambda v, z, i=i: tail(i, v, z, rngs[i])[0], variables[i], saved[i])
        grad_tail, gy = tail_vjp(gy)
        recomputed = head_output
      else:
        def recomputed(v: Any, prefix: Array, prefix_moments: Array | None, i: int = i) -> Array:
          return tail(i, v, head_output(v, prefix, prefix_moments), rngs[i])[0]
      _, layer_vjp = jax.vjp(recomputed, variables[i], channels(buf, 0, lo),
                             channels(moments, 0, lo))
      grad_variables[i], grad_prefix, grad_prefix_moments = layer_vjp(gy)
      if grad_tail is not None:
        grad_variables[i] = jax.tree_util.tree_map(jnp.add, grad_variables[i], grad_tail)
      grad = _add_prefix(grad, grad_prefix)
      if moments is not None:
        grad_moments = _add_prefix(grad_moments, grad_prefix_moments)
    return map_grad(0, c0), grad_variables, [None] * len(rngs)

  block.defvjp(block_fwd, block_bwd)
  buf, stats = block(x, list(variables), list(rngs))
  return buf, jax.lax.stop_gradient(stats)


def _add_prefix(buf: Array, update: Array) -> Array:
  """`buf` with `update` added to its first channels, in place when `buf` is dead after."""
  prefix = jax.lax.slice_in_dim(buf, 0, update.shape[-1], axis=-1)
  return jax.lax.dynamic_update_slice_in_dim(buf, prefix + update.astype(buf.dtype), 0, axis=-1)
