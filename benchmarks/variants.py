"""Benchmark-local prototypes of model changes, to MEASURE them (the product code is untouched).

Each variant is applied by `apply(name)` in a fresh process (they patch `densenet_jax.models`
module globals); `python benchmarks/run_variants.py` runs every one in its own subprocess.

  baseline    densenet_jax as shipped.
  dot1x1      every 1x1 convolution (bottlenecks, transitions) as a `lax.dot_general` over the
              channel axis. Same parameter tree (kernel (1, 1, in, out)), same init, same math.
              Why: XLA:CPU lowers the weight gradient of a 1x1 conv to a convolution whose
              "window" is the whole HxW image (dim_labels b01f_01io->b01f, window 32x32), which
              Eigen runs at ~3-5 GFLOP/s; as a dot it is one GEMM.
  dot1x1_sharedstats
              dot1x1 plus: the first BN of every dense layer takes its batch statistics from
              per-feature-map statistics computed once (training-mode BN is per channel, so the
              statistics of a channel do not depend on which layer reads it), instead of
              re-reducing the whole concatenation in every layer: O(L) instead of O(L^2) reductions.
  dot1x1_buffer
              dot1x1 plus a preallocated block buffer: each layer writes its k maps into a
              (N, H, W, C_out) buffer with dynamic_update_slice and reads the prefix, instead of
              concatenating all earlier maps.
  dot1x1_remat_layer
              dot1x1 with memory_efficient=True and the remat boundary around the WHOLE layer
              (both convs) rather than concat+BN+ReLU+conv1.
  ctchain     the block passes its list of feature maps through a per-layer identity whose
              backward is `lax.optimization_barrier` on the cotangents. Why: autodiff sums
              the cotangent of every feature map over all later layers, and XLA fuses each of
              those sums into one multi-input fusion (`slice_add_fusion` with ~150 operands),
              which keeps every layer's c_l-wide concat cotangent alive at once -- O(L^2)
              backward memory even with memory_efficient. Chained through barriers, each sum
              is accumulated layer by layer and the dead cotangents are freed.
  dot1x1_ctchain  both.
  dot1x1_ctchain_sharedstats  all three.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes

from densenet_jax import models

VARIANTS = ("baseline", "dot1x1", "dot1x1_sharedstats", "dot1x1_buffer", "dot1x1_remat_layer",
            "ctchain", "dot1x1_ctchain", "dot1x1_ctchain_sharedstats")


class Conv(nn.Module):
  """nn.Conv's parameters and init; a 1x1 stride-1 kernel runs as a dot_general."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] | None = None
  padding: Any = "SAME"
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    strides = tuple(self.strides or (1, 1))
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    assert not self.use_bias
    x, kernel = flax_dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if (kh, kw) == (1, 1) and strides == (1, 1):
      return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    padding = self.padding
    if isinstance(padding, str):
      pass
    else:
      padding = tuple(tuple(p) for p in padding)
    return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _NNProxy:
  """`flax.linen` with Conv replaced, installed as `models.nn`."""

  def __init__(self, **replacements):
    self._replacements = replacements

  def __getattr__(self, name):
    if name in self._replacements:
      return self._replacements[name]
    return getattr(nn, name)


# ------------------------------------------------------------------ shared BN statistics

class _SharedStatsLayer(nn.Module):
  """DenseLayer whose norm1 uses precomputed per-piece batch statistics (train mode)."""

  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, features, stats, train: bool):
    assert self.bn_size is not None and self.drop_rate == 0.0
    width = self.bn_size * self.growth_rate
    norm_kw = self.norm.keywords
    dtype = norm_kw.get("dtype") or jnp.float32
    momentum, eps = norm_kw["momentum"], norm_kw["epsilon"]

    def first(module, features, stats, train):
      del module
      bn = _StatsBN(momentum=momentum, epsilon=eps, dtype=dtype, name="norm1")
      x = jnp.concatenate(features, axis=-1)
      x = nn.relu(bn(x, stats, train))
      return self.conv(width, (1, 1), padding=((0, 0), (0, 0)), name="conv1")(x)

    if self.memory_efficient:
      first = nn.remat(first, static_argnums=(3,))
    y = first(self, features, stats, train)
    y = nn.relu(self.norm(name="norm2")(y, use_running_average=not train))
    return self.conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)


class _StatsBN(nn.Module):
  """BatchNorm with flax's parameter/statistics names, given (mean, mean of squares)."""

  momentum: float
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x, stats, train: bool):
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if train and not self.is_initializing():
      mean = jnp.concatenate([s[0] for s in stats])
      mean2 = jnp.concatenate([s[1] for s in stats])
      var = jnp.maximum(0.0, mean2 - jnp.square(mean))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    y = x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)
    return jnp.asarray(y, self.dtype)


def _piece_stats(x):
  xf = x.astype(jnp.float32)
  return (jnp.mean(xf, axis=(0, 1, 2)), jnp.mean(jnp.square(xf), axis=(0, 1, 2)))


class _SharedStatsBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  norm: Any
  conv: Any
  chain: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    features, stats = [x], [_piece_stats(x)]
    for i in range(self.num_layers):
      if self.chain:
        f, s = _grad_barrier((tuple(features), tuple(stats)))
        features, stats = list(f), list(s)
      y = _SharedStatsLayer(self.growth_rate, self.bn_size, self.drop_rate,
                            self.memory_efficient, self.norm, self.conv,
                            name=f"denselayer{i + 1}")(features, stats, train)
      features.append(y)
      stats.append(_piece_stats(y))
    return jnp.concatenate(features, axis=-1)


# ------------------------------------------------------------------ preallocated buffer

class _BufferBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, x, train: bool):
    c0 = x.shape[-1]
    total = c0 + self.num_layers * self.growth_rate
    buf = jnp.zeros(x.shape[:-1] + (total,), x.dtype)
    buf = jax.lax.dynamic_update_slice_in_dim(buf, x, 0, axis=3)
    for i in range(self.num_layers):
      c = c0 + i * self.growth_rate
      layer = models.DenseLayer(self.growth_rate, self.bn_size, self.drop_rate,
                                self.memory_efficient, self.norm, self.conv,
                                name=f"denselayer{i + 1}")
      y = layer([jax.lax.slice_in_dim(buf, 0, c, axis=3)], train)
      buf = jax.lax.dynamic_update_slice_in_dim(buf, y.astype(buf.dtype), c, axis=3)
    return buf


# ------------------------------------------------------------------ cotangent chain

@jax.custom_vjp
def _grad_barrier(xs):
  return xs


def _grad_barrier_fwd(xs):
  return xs, None


def _grad_barrier_bwd(_, cts):
  return (jax.lax.optimization_barrier(cts),)


_grad_barrier.defvjp(_grad_barrier_fwd, _grad_barrier_bwd)


class _CtChainBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, x, train: bool):
    features = [x]
    for i in range(self.num_layers):
      features = list(_grad_barrier(tuple(features)))
      layer = models.DenseLayer(self.growth_rate, self.bn_size, self.drop_rate,
                                self.memory_efficient, self.norm, self.conv,
                                name=f"denselayer{i + 1}")
      features.append(layer(features, train))
    return jnp.concatenate(features, axis=-1)


# ------------------------------------------------------------------ remat of the whole layer

class _RematWholeBlock(nn.Module):
  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  norm: Any
  conv: Any

  @nn.compact
  def __call__(self, x, train: bool):
    layer_cls = nn.remat(models.DenseLayer, static_argnums=(2,)) if self.memory_efficient \
        else models.DenseLayer
    features = [x]
    for i in range(self.num_layers):
      layer = layer_cls(self.growth_rate, self.bn_size, self.drop_rate, False, self.norm,
                        self.conv, name=f"denselayer{i + 1}")
      features.append(layer(features, train))
    return jnp.concatenate(features, axis=-1)


def apply(name: str) -> None:
  """Installs variant `name` into densenet_jax.models (call once, in a fresh process)."""
  if name not in VARIANTS:
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
  if name == "baseline":
    return
  if name == "ctchain":
    models.DenseBlock = _CtChainBlock
    return
  models.nn = _NNProxy(Conv=Conv)
  if name == "dot1x1_sharedstats":
    models.DenseBlock = _SharedStatsBlock
  elif name == "dot1x1_buffer":
    models.DenseBlock = _BufferBlock
  elif name == "dot1x1_remat_layer":
    models.DenseBlock = _RematWholeBlock
  elif name == "dot1x1_ctchain":
    models.DenseBlock = _CtChainBlock
  elif name == "dot1x1_ctchain_sharedstats":
    models.DenseBlock = functools.partial(_SharedStatsBlock, chain=True)


def param_shapes(model: models.DenseNet, size: int) -> dict[str, tuple[int, ...]]:
  """{'params/denseblock1/...': shape} of a model's variables (abstract, no compute)."""
  tree = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): tuple(v.shape) for k, v in flat}


_ORIGINAL = {"nn": models.nn, "DenseBlock": models.DenseBlock}


def restore() -> None:
  """Undoes `apply`."""
  models.nn = _ORIGINAL["nn"]
  models.DenseBlock = _ORIGINAL["DenseBlock"]


def check(name: str, memory_efficient: bool = False) -> dict[str, float]:
  """Same parameter tree and (to float32 rounding) same loss, gradients and BN statistics as
  the shipped model, on a small BC net with random weights and data."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  model = models.densenet_cifar(depth=16, growth_rate=12, memory_efficient=memory_efficient)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 32, 32, 3)), jnp.float32)
  labels = jnp.arange(8) % 10

  def run():
    variables = model.init(jax.random.key(1), x[:1])
    def loss(params):
      logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, train=True, mutable=["batch_stats"])
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1)), state
    (value, state), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return param_shapes(model, 32), value, grads, state

  restore()
  shapes0, loss0, grads0, state0 = run()
  apply(name)
  try:
    shapes1, loss1, grads1, state1 = run()
  finally:
    restore()
  if shapes0 != shapes1:
    raise AssertionError(f"{name}: parameter tree differs: "
                         f"{set(shapes0.items()) ^ set(shapes1.items())}")
  rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
  grad_err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel, grads0, grads1)))
  stat_err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(rel, state0, state1)))
  return {"variant": name, "memory_efficient": memory_efficient,
          "loss_abs_err": abs(float(loss0) - float(loss1)), "grad_max_rel_err": grad_err,
          "batch_stats_max_rel_err": stat_err}


if __name__ == "__main__":
  import json  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", False)
  for variant in VARIANTS[1:]:
    for me in (False, True):
      print(json.dumps(check(variant, me)), flush=True)
