"""The fast path under the paper's modules: same functions as nn.Conv and nn.BatchNorm, less work.

`models.py` builds the paper's DenseNet from these; each computes exactly what its textbook
counterpart does (tests/reference_test.py), and which of them a backend gets is one table,
`densenet_jax.backends`. `BatchNorm` normalises a block's concatenated maps from moments computed
once per map (`DenseFeatures`); `Conv` runs 1x1 kernels as matmuls where that is faster; the
initialisers compile quickly whatever JAX's threefry setting. The dense block as one buffer is
`densenet_jax.buffer`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array
ModuleDef = Any


def quick_to_compile(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  """`init` drawing its numbers with the non-partitionable threefry, whatever JAX's default.

  The partitionable threefry (JAX's default) unrolls into HLO that XLA:CPU compiles about ten
  times slower (docs/performance.md). A DenseNet's parameters are replicated, not sharded, when
  they are initialised, so partitionability buys nothing here.
  """

  def wrapped(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
    with jax.threefry_partitionable(False):
      return init(key, shape, dtype)

  return wrapped


# torchvision's `nn.init.kaiming_normal_`: fan-in, gain sqrt(2), an untruncated normal.
# (flax's `kaiming_normal` truncates, which changes the variance.)
he_normal = quick_to_compile(nn.initializers.variance_scaling(2.0, "fan_in", "normal"))

def _pair(v: int | Sequence[int]) -> tuple[int, ...]:
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Conv):
  """nn.Conv with torchvision's defaults (no bias, He-normal init); 1x1 kernels as matmuls.

  The matmul computes the same contraction with the same `kernel` parameter; `DenseNet` sets
  `matmul_1x1` where the backend's fast path says it is faster (densenet_jax.backends).
  """

  use_bias: bool = False
  kernel_init: Callable[..., Array] = he_normal
  matmul_1x1: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Convolves NHWC `x` with an HWIO kernel."""
    pointwise = (_pair(self.kernel_size) == (1, 1) and _pair(self.strides) == (1, 1)
                 and self.padding in ("SAME", "VALID", 0) and self.feature_group_count == 1
                 and _pair(self.input_dilation or 1) == (1, 1) and self.mask is None
                 and not self.use_bias)
    if not (self.matmul_1x1 and pointwise):
      return super().__call__(x)
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features),
                        self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())),
                               precision=self.precision)


def module_class(module: ModuleDef) -> type:
  while isinstance(module, functools.partial):
    module = module.func
  return module


def batch_moments(x: Array) -> Array:
  """Per-channel batch (mean, mean of squares) of NHWC `x`, float32, shape (2, C)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.stack([jnp.mean(x, axis=(0, 1, 2)), jnp.mean(jnp.square(x), axis=(0, 1, 2))])


def shares_moments(norm: ModuleDef, train: bool) -> bool:
  """Whether a dense block computes each map's moments once for `norm` (a training BatchNorm)."""
  return train and issubclass(module_class(norm), BatchNorm)


@flax.struct.dataclass
class DenseFeatures:
  """A dense block's feature maps so far and, when a `BatchNorm` will read them, their moments.

  This is where the shared-statistics trick lives. Training-mode BatchNorm is per channel, so
  a feature map's batch statistics do not depend on which later layer reads it: computing each
  map's (mean, mean of squares) once, when it is appended, replaces every layer re-reducing
  its whole concatenated input -- O(L) reductions per block instead of O(L^2). `BatchNorm`
  normalises a `DenseFeatures` from these moments; other norms read `concat()`.
  """

  maps: tuple[Array, ...]
  moments: tuple[Array, ...] | None  # one (2, C_i) per map; None when nothing reads them

  @classmethod
  def start(cls, x: Array, norm: ModuleDef, train: bool) -> DenseFeatures:
    """The block input as the first map; moments are kept when training with a `BatchNorm`."""
    return cls((x,), (batch_moments(x),) if shares_moments(norm, train) else None)

  def append(self, y: Array) -> DenseFeatures:
    """These maps followed by `y` (and its moments, if moments are kept)."""
    moments = None if self.moments is None else (*self.moments, batch_moments(y))
    return DenseFeatures((*self.maps, y), moments)

  def concat(self) -> Array:
    """The maps concatenated along channels."""
    return jnp.concatenate(self.maps, axis=-1)


class BatchNorm(nn.BatchNorm):
  """nn.BatchNorm that also normalises a `DenseFeatures` from the moments it carries.

  Same parameters, statistics and function as nn.BatchNorm (`scale`, `bias`; `mean`, `var`).
  """

  @nn.compact
  def __call__(self, x: Array | DenseFeatures, use_running_average: bool | None = None,
               **kwargs: Any) -> Array:
    """Normalises `x`, or the concatenation of a `DenseFeatures` that carries moments."""
    if not isinstance(x, DenseFeatures):
      return super().__call__(x, use_running_average, **kwargs)
    given = use_running_average  # flax merges it again: pass on what the caller gave
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    # The shared moments are per-channel means over the whole batch (fast variance); any other
    # option of nn.BatchNorm gets flax's own forward on the concatenation.
    plain = (self.axis not in (-1, x.maps[0].ndim - 1) or self.axis_index_groups is not None
             or not self.use_fast_variance or kwargs.get("mask") is not None)
    if x.moments is None or use_running_average or plain:
      return super().__call__(x.concat(), given, **kwargs)
    moments = jnp.concatenate(x.moments, axis=-1)
    if self.axis_name is not None and not self.is_initializing():
      moments = jax.lax.pmean(moments, self.axis_name)
    x = x.concat()
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    mean, mean_sq = moments
    var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype) if self.use_scale else 1
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype) if self.use_bias else 0
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    # x * mul + shift rather than (x - mean) * mul: autodiff then keeps x, which the
    # concatenation holds anyway, instead of a centred copy per layer.
    return jnp.asarray(x * mul + (bias - mean * mul), self.dtype)


def fields(module: ModuleDef) -> set[str]:
  return {f.name for f in dataclasses.fields(module_class(module))}


def configure(module: ModuleDef, **options: Any) -> ModuleDef:
  """`module` given each option that it has a field for and that its partial did not set."""
  given: dict[str, Any] = {}
  m = module
  while isinstance(m, functools.partial):
    given |= m.keywords
    m = m.func
  return functools.partial(module, **{k: v for k, v in options.items()
                                      if k in fields(m) and k not in given})
