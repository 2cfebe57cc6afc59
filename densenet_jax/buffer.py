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

Layers run as loops: consecutive layers whose prefixes round up to the same multiple of `lanes`
(a TPU's 128) read that wider prefix and share one loop body (`jax.lax.scan`), so a block
compiles a few bodies instead of one per layer. Their norm1 and 1x1-kernel rows are widened with
zeros, so the channels a layer would not have read add nothing, forward or backward: a zero
kernel row gives them a zero gradient, and a per-channel norm keeps them apart (other norms
read exact prefixes, one layer per body). On a TPU the wider prefix occupies the same lane
tiles as the exact one.

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
                keep_bottlenecks: bool, lanes: int, unroll: bool = False
                ) -> tuple[Array, list[Any]]:
  """The output of a dense block of `layers` (unbound `DenseLayer`s) on `x`, and each layer's
  updated batch statistics (empty where `mutable` is False).

  Args:
    layers: the block's layers, each with its `variables` (all collections) and dropout `rngs`.
    train: training mode (batch statistics, dropout).
    mutable: return the updated batch statistics (training with a mutable 'batch_stats').
    shared_moments: compute each map's BatchNorm moments once (`layers.DenseFeatures`).
    keep_bottlenecks: keep each layer's `head` output for the backward pass (else recompute it).
    lanes: layers whose prefixes round up to the same multiple of `lanes` run as one loop body
      on that wider prefix (1: each layer its own body). Only for per-channel norms.
    unroll: unroll those loops (each layer compiled on its own, as the same computation).
  """
  c0 = x.shape[-1]
  growth = [layer.growth_rate for layer in layers]
  offsets = [c0 + sum(growth[:i]) for i in range(len(layers) + 1)]
  groups = _groups(offsets, growth, lanes)
  keep = keep_bottlenecks and layers[0].bn_size is not None  # a basic layer's head output is
  # its map, already in the buffer

  def channels(a: Array | None, lo: int, hi: int) -> Array | None:
    return None if a is None else jax.lax.slice_in_dim(a, lo, hi, axis=-1)

  def features(prefix: Array, prefix_moments: Array | None) -> DenseFeatures:
    return DenseFeatures((prefix,), None if prefix_moments is None else (prefix_moments,))

  def head(layer: nn.Module, v: Any, feats: DenseFeatures, rng: Array | None):
    return _apply(layer, type(layer).head, v, feats, train, mutable, rng)

  def tail(layer: nn.Module, v: Any, z: Array, rng: Array | None):
    return _apply(layer, type(layer).tail, v, z, train, mutable, rng)

  def stacked(group: _Group, variables: Sequence[Any], rngs: Sequence[Array | None]) -> Any:
    """The group's variables widened to its prefix and stacked, its rngs and map offsets."""
    first, last, width = group
    wide = [_widen(variables[i], variables[first], variables[min(first + 1, last - 1)],
                   width - offsets[i]) for i in range(first, last)]
    return (jax.tree_util.tree_map(lambda *a: jnp.stack(a), *wide),
            None if rngs[first] is None else jnp.stack(rngs[first:last]),
            jnp.asarray(offsets[first:last], jnp.int32))

  def forward(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, offsets[-1] - c0)])
    moments = None
    if shared_moments:
      moments = jnp.pad(batch_moments(x), [(0, 0), (0, offsets[-1] - c0)])
    bottlenecks, stats = [], []  # per group: stacked head outputs (if kept); each layer's stats
    for group in groups:
      layer, width = layers[group[0]], group[2]

      def step(carry: Any, xs: Any, layer: nn.Module = layer, width: int = width):
        buf, moments = carry
        v, rng, offset = xs
        feats = features(channels(buf, 0, width), channels(moments, 0, width))
        z, head_stats = head(layer, v, feats, rng)
        # the tail starts from the head's updated statistics and returns all of the layer's
        y, layer_stats = tail(layer, {**v, "batch_stats": head_stats} if mutable else v, z, rng)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), offset, axis=-1)
        if moments is not None:
          moments = jax.lax.dynamic_update_slice_in_dim(moments, batch_moments(y), offset,
                                                        axis=-1)
        return (buf, moments), (z if keep else None, layer_stats)

      (buf, moments), (z, group_stats) = jax.lax.scan(
          step, (buf, moments), stacked(group, variables, rngs),
          unroll=unroll or group[1] - group[0] == 1)
      bottlenecks.append(z)
      stats += _unstack(group_stats, [v.get("batch_stats", {}) if mutable else {}
                                      for v in variables[group[0]:group[1]]])
    return buf, moments, bottlenecks, stats

  @jax.custom_vjp
  def block(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf, _, _, stats = forward(x, variables, rngs)
    return buf, stats

  def block_fwd(x: Array, variables: Sequence[Any], rngs: Sequence[Array | None]):
    buf, moments, bottlenecks, stats = forward(x, variables, rngs)
    saved = bottlenecks if keep else None
    return (buf, stats), (buf, moments, saved, variables, rngs)

  def block_bwd(residuals: Any, cotangents: Any):
    buf, moments, saved, variables, rngs = residuals
    grad, _ = cotangents  # the statistics are not differentiable (stop_gradient below)
    grad_moments = None if moments is None else jnp.zeros_like(moments)
    grad_variables = []

    def map_grad(grad: Array, grad_moments: Array | None, lo: Any, size: int) -> Array:
      """The whole gradient of channels [lo, lo + size): as read, and through their moments."""
      g = jax.lax.dynamic_slice_in_dim(grad, lo, size, axis=-1)
      if moments is None:
        return g
      _, moments_vjp = jax.vjp(batch_moments,
                               jax.lax.dynamic_slice_in_dim(buf, lo, size, axis=-1))
      return g + moments_vjp(jax.lax.dynamic_slice_in_dim(grad_moments, lo, size, axis=-1))[0]

    for gi in reversed(range(len(groups))):
      first, last, width = groups[gi]
      layer = layers[first]

      def step(carry: Any, xs: Any, layer: nn.Module = layer, width: int = width):
        grad, grad_moments = carry
        (v, rng, offset), z = xs
        gy = map_grad(grad, grad_moments, offset, layer.growth_rate)

        def head_output(v: Any, prefix: Array, prefix_moments: Array | None) -> Array:
          return head(layer, v, features(prefix, prefix_moments), rng)[0]

        grad_tail = None
        if z is not None:
          _, tail_vjp = jax.vjp(lambda v, z: tail(layer, v, z, rng)[0], v, z)
          grad_tail, gy = tail_vjp(gy)
          recomputed = head_output
        else:
          def recomputed(v: Any, prefix: Array, prefix_moments: Array | None) -> Array:
            return tail(layer, v, head_output(v, prefix, prefix_moments), rng)[0]
        _, layer_vjp = jax.vjp(recomputed, v, channels(buf, 0, width),
                               channels(moments, 0, width))
        grad_v, grad_prefix, grad_prefix_moments = layer_vjp(gy)
        if grad_tail is not None:
          grad_v = jax.tree_util.tree_map(jnp.add, grad_v, grad_tail)
        grad = _add_prefix(grad, grad_prefix)
        if grad_moments is not None:
          grad_moments = _add_prefix(grad_moments, grad_prefix_moments)
        return (grad, grad_moments), grad_v

      (grad, grad_moments), grad_group = jax.lax.scan(
          step, (grad, grad_moments),
          (stacked(groups[gi], variables, rngs), None if saved is None else saved[gi]),
          reverse=True, unroll=unroll or last - first == 1)
      grad_variables = _unstack(grad_group, variables[first:last]) + grad_variables
    return map_grad(grad, grad_moments, 0, c0), grad_variables, [None] * len(rngs)

  block.defvjp(block_fwd, block_bwd)
  buf, stats = block(x, list(variables), list(rngs))
  return buf, jax.lax.stop_gradient(stats)


_Group = tuple[int, int, int]  # layers [first, last) reading a prefix of this many channels


def _groups(offsets: Sequence[int], growth: Sequence[int], lanes: int) -> list[_Group]:
  """Runs of equal layers whose prefixes round up to the same multiple of `lanes` (at most the
  block's width); a layer alone reads its own prefix."""
  groups: list[_Group] = []
  for i, start in enumerate(offsets[:-1]):
    width = min(-(-start // lanes) * lanes, offsets[-1])
    if groups and groups[-1][2] == width and growth[i] == growth[groups[-1][0]]:
      groups[-1] = (groups[-1][0], i + 1, width)
    else:
      groups.append((i, i + 1, width))
  return [group if group[1] - group[0] > 1 else (group[0], group[1], offsets[group[0]])
          for group in groups]


def _widen(tree: Any, a: Any, b: Any, extra: int) -> Any:
  """`tree` with `extra` zeros appended on each axis where the layers' variables `a` and `b`
  differ (their input channels): a zero row of a per-channel norm and of the 1x1 convolution
  makes an unwritten or later channel of the wider prefix add exactly nothing, forward or back."""
  def pad(leaf: Array, x: Array, y: Array) -> Array:
    return jnp.pad(leaf, [(0, extra if m != n else 0) for m, n in zip(x.shape, y.shape)])
  return jax.tree_util.tree_map(pad, tree, a, b)


def _unstack(tree: Any, like: Sequence[Any]) -> list[Any]:
  """Each layer's slice of a stacked `tree`, cut back to the shapes of `like`'s leaves."""
  return [jax.tree_util.tree_map(lambda s, ref, i=i: s[i][tuple(map(slice, ref.shape))],
                                 tree, ref) for i, ref in enumerate(like)]


def _add_prefix(buf: Array, update: Array) -> Array:
  """`buf` with `update` added to its first channels, in place when `buf` is dead after."""
  prefix = jax.lax.slice_in_dim(buf, 0, update.shape[-1], axis=-1)
  return jax.lax.dynamic_update_slice_in_dim(buf, prefix + update.astype(buf.dtype), 0, axis=-1)
