"""DenseNet (Huang et al., CVPR 2017) in Flax linen, NHWC.

The modules read like the paper: a `DenseLayer` is the composite function H_l
(BN-ReLU-Conv, with the optional 1x1 bottleneck), a `DenseBlock` feeds every layer
the channel concatenation of all earlier feature maps, a `Transition` compresses and
downsamples, and `DenseNet` stacks them behind a CIFAR or ImageNet stem.

Parameter names follow torchvision (`conv0`, `norm0`, `denseblock1/denselayer1/norm1`,
`transition1/conv`, ...) so that weight conversion is a rename, not a puzzle.

Three implementation choices change the cost, not the function (tests/test_reference.py holds
the model equal to a textbook one; benchmarks/NOTES.md has the measurements): each feature
map's BatchNorm moments are computed once per block, not once per reading layer; 1x1
convolutions run as matmuls; and each block's gradients accumulate layer by layer, which
makes `memory_efficient=True` linear in depth.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
ModuleDef = Any

# torchvision's `nn.init.kaiming_normal_`: fan-in, gain sqrt(2), an untruncated normal.
# (flax's `kaiming_normal` truncates, which changes the variance.)
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

STEMS = ("cifar", "imagenet")


class Conv(nn.Module):
  """A bias-free convolution with nn.Conv's `kernel` parameter and torchvision's padding.

  A 1x1 stride-1 kernel runs as one matmul over channels: XLA:CPU lowers the weight
  gradient of a 1x1 convolution as a convolution whose window is the whole image, several
  times slower than the same contraction as a GEMM (benchmarks/NOTES.md).
  """

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = he_normal

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Convolves NHWC `x` with an HWIO kernel."""
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if tuple(self.kernel_size) == (1, 1) and tuple(self.strides) == (1, 1):
      return jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))
    # torchvision's symmetric k//2 ('SAME' would pad a stride-2 convolution asymmetrically).
    padding = [(k // 2, k // 2) for k in self.kernel_size]
    return jax.lax.conv_general_dilated(x, kernel, self.strides, padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def batch_moments(x: Array, axis_name: str | tuple[str, ...] | None = None) -> Array:
  """Per-channel batch (mean, mean of squares) of NHWC `x`, float32, shape (2, C)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  moments = jnp.stack([jnp.mean(x, axis=(0, 1, 2)), jnp.mean(jnp.square(x), axis=(0, 1, 2))])
  return moments if axis_name is None else jax.lax.pmean(moments, axis_name)


class ConcatBatchNorm(nn.Module):
  """BatchNorm of the concatenation of feature maps whose batch moments are already known.

  Training-mode BatchNorm is per channel, so a feature map's statistics do not depend on
  which later layer reads it: the block computes each map's moments once (O(L) reductions)
  instead of every layer re-reducing its whole input (O(L^2)). Same math, parameters and
  statistics as `nn.BatchNorm` (`scale`, `bias`; `mean`, `var`).
  """

  momentum: float
  epsilon: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, features: Sequence[Array], moments: Sequence[Array] | None,
               train: bool) -> Array:
    """Normalises concat(features); `moments` (one (2, C_i) per map) is used in training."""
    x = jnp.concatenate(features, axis=-1)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    if train:
      mean, mean_sq = jnp.concatenate(moments, axis=-1)
      var = jnp.maximum(0.0, mean_sq - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    else:
      mean, var = ra_mean.value, ra_var.value
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    # x * mul + shift rather than (x - mean) * mul: autodiff then keeps x, which the
    # concatenation holds anyway, instead of a centred copy per layer.
    y = x * mul + (bias - mean * mul)
    return jnp.asarray(y, self.dtype)


class DenseLayer(nn.Module):
  """H_l: [BN-ReLU-Conv1x1(bn_size*k)]-BN-ReLU-Conv3x3(k) on the concatenated inputs."""

  growth_rate: int
  bn_size: int | None  # None: the basic layer without bottleneck
  drop_rate: float
  memory_efficient: bool
  concat_norm: ModuleDef
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(self, features: Sequence[Array], moments: Sequence[Array] | None,
               train: bool) -> Array:
    """The k new feature maps from all earlier ones (`moments`: theirs, used in training)."""
    bottleneck = self.bn_size is not None
    width = self.bn_size * self.growth_rate if bottleneck else self.growth_rate
    kernel = (1, 1) if bottleneck else (3, 3)

    def first_conv(module: nn.Module, features: Sequence[Array],
                   moments: Sequence[Array] | None, train: bool) -> Array:
      del module  # the lifted scope; submodules below attach to it
      x = nn.relu(self.concat_norm(name="norm1")(features, moments, train))
      return self.conv(width, kernel, name="conv1")(x)

    if self.memory_efficient:
      # Pleiss et al. 2017: the concat+BN+ReLU output is the only tensor that grows with
      # the layer index; recomputing it in the backward pass makes memory linear in depth.
      first_conv = nn.remat(first_conv, static_argnums=(3,))
    y = self._dropout(first_conv(self, features, moments, train), train)
    if bottleneck:
      y = nn.relu(self.norm(name="norm2")(y, use_running_average=not train))
      y = self.conv(self.growth_rate, (3, 3), name="conv2")(y)
      y = self._dropout(y, train)
    return y

  def _dropout(self, x: Array, train: bool) -> Array:
    if self.drop_rate == 0.0:
      return x
    return nn.Dropout(self.drop_rate, deterministic=not train)(x)


class DenseBlock(nn.Module):
  """`num_layers` dense layers; the output concatenates the input and every new map."""

  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  concat_norm: ModuleDef
  norm: ModuleDef
  conv: ModuleDef
  bn_axis_name: str | tuple[str, ...] | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps m0 channels to m0 + num_layers * growth_rate channels."""
    axis_name = None if self.is_initializing() else self.bn_axis_name

    def moments_of(x: Array) -> Array | None:
      return batch_moments(x, axis_name) if train else None

    features, moments = [x], [moments_of(x)]
    for i in range(self.num_layers):
      # The barrier's transpose is a barrier on the gradients: each map's gradient is then
      # accumulated layer by layer. Without it, XLA sums it over all later layers in one
      # fusion that keeps every later layer's input gradient alive (O(L^2) memory).
      features, moments = jax.lax.optimization_barrier((features, moments))
      layer = DenseLayer(
          growth_rate=self.growth_rate,
          bn_size=self.bn_size,
          drop_rate=self.drop_rate,
          memory_efficient=self.memory_efficient,
          concat_norm=self.concat_norm,
          norm=self.norm,
          conv=self.conv,
          name=f"denselayer{i + 1}",
      )
      y = layer(features, moments, train)
      features, moments = [*features, y], [*moments, moments_of(y)]
    return jnp.concatenate(features, axis=-1)


class Transition(nn.Module):
  """BN-ReLU-Conv1x1(out_channels)-AvgPool 2x2/2 between dense blocks."""

  out_channels: int
  drop_rate: float
  norm: ModuleDef
  conv: ModuleDef

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Compresses channels and halves the spatial size."""
    x = nn.relu(self.norm(name="norm")(x, use_running_average=not train))
    x = self.conv(self.out_channels, (1, 1), name="conv")(x)
    if self.drop_rate > 0.0:
      x = nn.Dropout(self.drop_rate, deterministic=not train)(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """A DenseNet classifier (or backbone) for NHWC images.

  Attributes:
    growth_rate: k, the channels each dense layer adds.
    block_config: number of dense layers in each block.
    num_init_features: channels of the stem convolution.
    bn_size: bottleneck width factor (1x1 conv to bn_size*k channels); None disables
      the bottleneck (the paper's basic DenseNet).
    compression: theta; a transition keeps floor(theta * m) of its m channels.
    drop_rate: dropout after every convolution but the stem's (paper section 4.2).
    num_classes: classifier outputs; 0 returns the pooled features instead.
    stem: 'cifar' (3x3 conv) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    in_channels: channels expected in the input images.
    features_only: return a dict of the stem and every block's output (a backbone).
    dtype: computation dtype (e.g. jnp.bfloat16); BN statistics stay float32.
    param_dtype: parameter dtype.
    memory_efficient: recompute concat+BN+ReLU in the backward pass (linear memory).
    bn_axis_name: mesh/pmap axis name(s) for cross-replica BatchNorm statistics.
    bn_momentum: flax convention, running = momentum * running + (1 - momentum) * batch;
      0.9 equals torch's momentum=0.1.
    bn_epsilon: BatchNorm epsilon (torchvision 1e-5; Keras applications 1.001e-5).
  """

  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int | None = 4
  compression: float = 0.5
  drop_rate: float = 0.0
  num_classes: int = 1000
  stem: str = "imagenet"
  in_channels: int = 3
  features_only: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  memory_efficient: bool = False
  bn_axis_name: str | tuple[str, ...] | None = None
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def __post_init__(self) -> None:
    _check_config(self)
    super().__post_init__()

  @property
  def depth(self) -> int:
    """L in the paper: convolutional and fully connected layers on the main path."""
    convs_per_layer = 1 if self.bn_size is None else 2
    return 1 + convs_per_layer * sum(self.block_config) + len(self.block_config) - 1 + 1

  def block_channels(self) -> list[tuple[int, int]]:
    """(channels out of block i, channels out of the transition after it) for each block."""
    out, m = [], self.num_init_features
    for i, n in enumerate(self.block_config):
      m += n * self.growth_rate
      block_out = m
      if i < len(self.block_config) - 1:
        m = int(math.floor(self.compression * m))
      out.append((block_out, m))
    return out

  def min_input_size(self) -> int:
    """The smallest square input for which every stage has at least one pixel."""
    size = 1
    while _stage_sizes(size, self.stem, len(self.block_config)) is None:
      size += 1
    return size

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array | dict[str, Array]:
    """Logits (N, num_classes), pooled features if num_classes == 0, or stage maps."""
    self._check_input(x)
    norm = functools.partial(
        nn.BatchNorm,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        axis_name=self.bn_axis_name,
    )
    concat_norm = functools.partial(
        ConcatBatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon, dtype=self.dtype,
        param_dtype=self.param_dtype,
    )
    conv = functools.partial(Conv, dtype=self.dtype, param_dtype=self.param_dtype)
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      x = conv(self.num_init_features, (7, 7), strides=(2, 2), name="conv0")(x)
      x = nn.relu(norm(name="norm0")(x, use_running_average=not train))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.num_init_features, (3, 3), name="conv0")(x)
    stages = {"stem": x}

    channels = self.block_channels()
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(
          num_layers=num_layers,
          growth_rate=self.growth_rate,
          bn_size=self.bn_size,
          drop_rate=self.drop_rate,
          memory_efficient=self.memory_efficient,
          concat_norm=concat_norm,
          norm=norm,
          conv=conv,
          bn_axis_name=self.bn_axis_name,
          name=f"denseblock{i + 1}",
      )(x, train)
      stages[f"block{i + 1}"] = x
      if i < len(self.block_config) - 1:
        x = Transition(channels[i][1], self.drop_rate, norm, conv,
                       name=f"transition{i + 1}")(x, train)
    if self.features_only:
      return stages

    x = nn.relu(norm(name="norm_final")(x, use_running_average=not train))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes == 0:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    bias_init=nn.initializers.zeros, name="classifier")(x)

  def _check_input(self, x: Array) -> None:
    shape = tuple(x.shape)
    if len(shape) != 4:
      hint = " Add a batch axis: x[None]." if len(shape) == 3 else ""
      raise ValueError(f"DenseNet expects a batch of NHWC images (N, H, W, C); got shape "
                       f"{shape}.{hint}")
    if shape[-1] != self.in_channels:
      if shape[1] == self.in_channels:
        raise ValueError(
            f"DenseNet expects NHWC input with {self.in_channels} channels last; got shape "
            f"{shape}, which looks like NCHW. Transpose it: jnp.transpose(x, (0, 2, 3, 1)).")
      raise ValueError(f"DenseNet expects {self.in_channels} input channels (last axis); got "
                       f"shape {shape}. Set in_channels={shape[-1]} if that is intended.")
    if _stage_sizes(min(shape[1], shape[2]), self.stem, len(self.block_config)) is None:
      raise ValueError(
          f"Input {shape[1]}x{shape[2]} is too small for a {len(self.block_config)}-block "
          f"DenseNet with the '{self.stem}' stem: it needs at least "
          f"{self.min_input_size()}x{self.min_input_size()}. Resize the images up.")


def _stage_sizes(size: int, stem: str, num_blocks: int) -> list[int] | None:
  """Spatial size entering each block, or None if some stage would be empty."""
  if size < 1:
    return None
  if stem == "imagenet":
    size = (size - 1) // 2 + 1  # 7x7/2 conv, padding 3
    size = (size - 1) // 2 + 1  # 3x3/2 max pool, padding 1
  sizes = [size]
  for _ in range(num_blocks - 1):
    if size < 2:
      return None
    size //= 2
    sizes.append(size)
  return sizes


def _check_config(m: DenseNet) -> None:
  """Rejects configurations that cannot describe a DenseNet, naming the fix."""
  problems = []
  if not isinstance(m.growth_rate, int) or m.growth_rate <= 0:
    problems.append(f"growth_rate must be a positive int, got {m.growth_rate!r}")
  if (not m.block_config or
      any(not isinstance(n, int) or n <= 0 for n in m.block_config)):
    problems.append(f"block_config must be a non-empty sequence of positive ints, got "
                    f"{m.block_config!r}")
  if not isinstance(m.num_init_features, int) or m.num_init_features <= 0:
    problems.append(f"num_init_features must be a positive int, got {m.num_init_features!r}")
  if m.bn_size is not None and (not isinstance(m.bn_size, int) or m.bn_size <= 0):
    problems.append(f"bn_size must be a positive int or None (no bottleneck), got "
                    f"{m.bn_size!r}")
  if not 0.0 < m.compression <= 1.0:
    problems.append(f"compression (theta) must lie in (0, 1], got {m.compression!r}")
  if not 0.0 <= m.drop_rate < 1.0:
    problems.append(f"drop_rate must lie in [0, 1), got {m.drop_rate!r}")
  if not isinstance(m.num_classes, int) or m.num_classes < 0:
    problems.append(f"num_classes must be an int >= 0 (0: pooled features), got "
                    f"{m.num_classes!r}")
  if m.stem not in STEMS:
    problems.append(f"stem must be one of {STEMS}, got {m.stem!r}")
  if not isinstance(m.in_channels, int) or m.in_channels <= 0:
    problems.append(f"in_channels must be a positive int, got {m.in_channels!r}")
  if problems:
    raise ValueError("Invalid DenseNet config: " + "; ".join(problems) + ".")


# ----------------------------------------------------------------------------- presets

_REGISTRY: dict[str, Callable[..., DenseNet]] = {}


def register(fn: Callable[..., DenseNet]) -> Callable[..., DenseNet]:
  """Adds a preset constructor to the registry under its function name."""
  _REGISTRY[fn.__name__] = fn
  return fn


def list_models() -> list[str]:
  """Names of every registered preset, in paper order."""
  return list(_REGISTRY)


def get_model(name: str, **overrides: Any) -> DenseNet:
  """Builds a preset by name; keyword overrides replace any DenseNet attribute."""
  if name not in _REGISTRY:
    raise ValueError(f"Unknown model {name!r}. Available: {', '.join(list_models())}.")
  return _REGISTRY[name](**overrides)


def cifar_block_config(depth: int, bottleneck: bool) -> tuple[int, int, int]:
  """Layers per block of a 3-block CIFAR/SVHN DenseNet of depth L (paper section 3)."""
  per_layer = 6 if bottleneck else 3
  if depth <= 4 or (depth - 4) % per_layer:
    rule = "(L-4)/6" if bottleneck else "(L-4)/3"
    raise ValueError(f"depth L={depth} does not fit the {rule} rule for a "
                     f"{'DenseNet-BC' if bottleneck else 'basic DenseNet'}: L-4 must be a "
                     f"positive multiple of {per_layer} (e.g. {4 + per_layer * 16}).")
  n = (depth - 4) // per_layer
  return (n, n, n)


def densenet_cifar(depth: int, growth_rate: int, bottleneck: bool = True,
                   **kwargs: Any) -> DenseNet:
  """A 3-block CIFAR/SVHN DenseNet; BC nets use a 2k stem and theta=0.5, basic 16 and 1."""
  defaults = dict(
      growth_rate=growth_rate,
      block_config=cifar_block_config(depth, bottleneck),
      num_init_features=2 * growth_rate if bottleneck else 16,
      bn_size=4 if bottleneck else None,
      compression=0.5 if bottleneck else 1.0,
      num_classes=10,
      stem="cifar",
  )
  return DenseNet(**{**defaults, **kwargs})


def densenet_imagenet(block_config: Sequence[int], growth_rate: int = 32,
                      **kwargs: Any) -> DenseNet:
  """A 4-block ImageNet DenseNet-BC with a 2k-channel 7x7/2 stem."""
  defaults = dict(growth_rate=growth_rate, block_config=tuple(block_config),
                  num_init_features=2 * growth_rate, stem="imagenet", num_classes=1000)
  return DenseNet(**{**defaults, **kwargs})


@register
def densenet40(**kwargs: Any) -> DenseNet:
  """DenseNet (L=40, k=12), 1.0M parameters."""
  return densenet_cifar(**(dict(depth=40, growth_rate=12, bottleneck=False) | kwargs))


@register
def densenet100_k12(**kwargs: Any) -> DenseNet:
  """DenseNet (L=100, k=12), 7.0M parameters."""
  return densenet_cifar(**(dict(depth=100, growth_rate=12, bottleneck=False) | kwargs))


@register
def densenet100_k24(**kwargs: Any) -> DenseNet:
  """DenseNet (L=100, k=24), 27.2M parameters."""
  return densenet_cifar(**(dict(depth=100, growth_rate=24, bottleneck=False) | kwargs))


@register
def densenet_bc_100(**kwargs: Any) -> DenseNet:
  """DenseNet-BC (L=100, k=12), 0.8M parameters."""
  return densenet_cifar(**(dict(depth=100, growth_rate=12) | kwargs))


@register
def densenet_bc_250(**kwargs: Any) -> DenseNet:
  """DenseNet-BC (L=250, k=24), 15.3M parameters."""
  return densenet_cifar(**(dict(depth=250, growth_rate=24) | kwargs))


@register
def densenet_bc_190(**kwargs: Any) -> DenseNet:
  """DenseNet-BC (L=190, k=40), 25.6M parameters."""
  return densenet_cifar(**(dict(depth=190, growth_rate=40) | kwargs))


@register
def densenet121(**kwargs: Any) -> DenseNet:
  """DenseNet-121 (k=32), 7,978,856 parameters."""
  return densenet_imagenet(**(dict(block_config=(6, 12, 24, 16)) | kwargs))


@register
def densenet161(**kwargs: Any) -> DenseNet:
  """DenseNet-161 (k=48, 96-channel stem), 28,681,000 parameters."""
  return densenet_imagenet(**(dict(block_config=(6, 12, 36, 24), growth_rate=48) | kwargs))


@register
def densenet169(**kwargs: Any) -> DenseNet:
  """DenseNet-169 (k=32), 14,149,480 parameters."""
  return densenet_imagenet(**(dict(block_config=(6, 12, 32, 32)) | kwargs))


@register
def densenet201(**kwargs: Any) -> DenseNet:
  """DenseNet-201 (k=32), 20,013,928 parameters."""
  return densenet_imagenet(**(dict(block_config=(6, 12, 48, 32)) | kwargs))


@register
def densenet264(**kwargs: Any) -> DenseNet:
  """DenseNet-264 (k=32); the paper's name, though the layer count is 265."""
  return densenet_imagenet(**(dict(block_config=(6, 12, 64, 48)) | kwargs))


def native_input_shape(model: DenseNet, batch_size: int = 1) -> tuple[int, int, int, int]:
  """The input shape a preset was designed for: 32x32 (CIFAR stem) or 224x224."""
  size = 32 if model.stem == "cifar" else 224
  return (batch_size, size, size, model.in_channels)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (BatchNorm running statistics excluded)."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
