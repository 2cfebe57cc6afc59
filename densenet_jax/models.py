"""DenseNet (Huang et al., CVPR 2017) in Flax linen, NHWC.

The modules read like the paper: a `DenseLayer` is the composite function H_l
(BN-ReLU-Conv, with the optional 1x1 bottleneck), a `DenseBlock` feeds every layer
the channel concatenation of all earlier feature maps, a `Transition` compresses and
downsamples, and `DenseNet` stacks them behind a CIFAR or ImageNet stem. The convolution,
normalisation and activation are attributes (`conv`, `norm`, `act`), as in flax's ResNet.

Parameter names follow torchvision (`conv0`, `norm0`, `denseblock1/denselayer1/norm1`,
`transition1/conv`, ...) so that weight conversion is a rename, not a puzzle. One exception:
the final norm is `norm_final` (torchvision's `features.norm5`, Keras' `bn`); the converters map
both, and renaming it would orphan every checkpoint written so far.

The defaults are the fast versions of nn.Conv and nn.BatchNorm in `densenet_jax.layers`, which
compute the same function (tests/reference_test.py holds the model equal to a textbook one);
what each backend gets is one table, `densenet_jax.backends`, and plain attributes here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from densenet_jax import backends, buffer, layers
# The fast-path layers, re-exported: `models.Conv`, `models.BatchNorm`, ... as before.
from densenet_jax.layers import BatchNorm, Conv, DenseFeatures, he_normal, quick_to_compile

Array = jax.Array
ModuleDef = Any

STEMS = ("cifar", "imagenet")


class DenseLayer(nn.Module):
  """H_l: [norm-act-Conv1x1(bn_size*k)]-norm-act-Conv3x3(k) of the concatenated inputs.

  `head` (norm1-act-conv1) reads the earlier maps, `tail` (norm2-act-conv2, the bottleneck's
  second half) only the head's output: the one-buffer block (`densenet_jax.buffer`)
  differentiates them separately.
  """

  growth_rate: int
  bn_size: int | None  # None: the basic layer without bottleneck
  drop_rate: float
  memory_efficient: bool
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]

  def setup(self) -> None:
    bottleneck = self.bn_size is not None
    self.norm1 = self.norm()
    self.conv1 = self.conv(self.bn_size * self.growth_rate if bottleneck else self.growth_rate,
                           (1, 1) if bottleneck else (3, 3))
    if bottleneck:
      self.norm2 = self.norm()
      self.conv2 = self.conv(self.growth_rate, (3, 3))
    if self.drop_rate > 0.0:
      self.dropout = nn.Dropout(self.drop_rate)

  def __call__(self, inputs: DenseFeatures, train: bool) -> Array:
    """The k new feature maps from all earlier ones."""
    return self.tail(self.head(inputs, train), train)

  def head(self, inputs: DenseFeatures, train: bool) -> Array:
    """norm1-act-conv1 of the concatenated inputs (torchvision's `bn_function`): the 1x1
    bottleneck, or a basic layer's only (3x3) convolution."""
    bn_function = DenseLayer.bn_function
    if self.memory_efficient:
      # Pleiss et al. 2017: the concat-norm-act output is the only tensor that grows with the
      # layer index; recomputing it in the backward pass makes memory linear in depth.
      bn_function = nn.remat(bn_function)
    return self._dropout(bn_function(self, inputs), train)

  def bn_function(self, inputs: DenseFeatures) -> Array:
    """conv1(act(norm1(inputs)))."""
    return self.conv1(self.act(self.norm1(
        inputs if inputs.moments is not None else inputs.concat())))

  def tail(self, x: Array, train: bool) -> Array:
    """norm2-act-conv2 of the bottleneck's output (the identity in a basic layer)."""
    if self.bn_size is None:
      return x
    return self._dropout(self.conv2(self.act(self.norm2(x))), train)

  def _dropout(self, x: Array, train: bool) -> Array:
    if self.drop_rate == 0.0:
      return x
    return self.dropout(x, deterministic=not train)


class DenseBlock(nn.Module):
  """`num_layers` dense layers; the output concatenates the input and every new map."""

  num_layers: int
  growth_rate: int
  bn_size: int | None
  drop_rate: float
  memory_efficient: bool
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]
  layer_barrier: bool = False
  buffer: bool = False  # one buffer and a custom backward pass (densenet_jax.buffer)
  # With a per-channel norm, the buffer's layers whose prefixes round up to the same multiple
  # of this run as one loop body: a TPU pads channels to its 128 lanes, so they read no more.
  buffer_lanes: int = 128
  buffer_unroll: bool = False  # one body per layer (DenseNet.unroll_layers)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Maps m0 channels to m0 + num_layers * growth_rate channels."""
    if self.buffer and not self.is_initializing():
      return self._buffered(x, train)
    features = DenseFeatures.start(x, self.norm, train)
    for i in range(self.num_layers):
      if self.layer_barrier:
        # The barrier's transpose is a barrier on the gradients: each map's gradient is then
        # accumulated layer by layer. Without it, XLA:CPU sums it over all later layers in
        # one fusion that keeps every later layer's input gradient alive (O(L^2) memory).
        features = jax.lax.optimization_barrier(features)
      features = features.append(self._layer(name=f"denselayer{i + 1}")(features, train))
    return features.concat()

  def _layer(self, **kwargs: Any) -> DenseLayer:
    options = dict(growth_rate=self.growth_rate, bn_size=self.bn_size, drop_rate=self.drop_rate,
                   memory_efficient=self.memory_efficient, conv=self.conv, norm=self.norm,
                   act=self.act)
    return DenseLayer(**(options | kwargs))

  def _buffered(self, x: Array, train: bool) -> Array:
    """The same block computed by `buffer.dense_block`, on this block's variables."""
    names = [f"denselayer{i + 1}" for i in range(self.num_layers)]
    variables = [{col: tree[name] for col, tree in self.variables.items() if name in tree}
                 for name in names]
    dropout = train and self.drop_rate > 0.0
    rngs = [self.make_rng("dropout") if dropout else None for _ in names]
    mutable = train and self.is_mutable_collection("batch_stats")
    y, stats = buffer.dense_block(
        [self._layer(memory_efficient=False, parent=None) for _ in names], x, variables, rngs,
        train, mutable, layers.shares_moments(self.norm, train),
        keep_bottlenecks=not self.memory_efficient, unroll=self.buffer_unroll,
        lanes=self.buffer_lanes if issubclass(layers.module_class(self.norm), nn.BatchNorm) else 1)
    for name, updates in zip(names, stats):
      if updates:
        self.put_variable("batch_stats", name, updates)
    return y


class Transition(nn.Module):
  """norm-act-Conv1x1(out_channels)-AvgPool 2x2/2 between dense blocks."""

  out_channels: int
  drop_rate: float
  conv: ModuleDef
  norm: ModuleDef
  act: Callable[[Array], Array]

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    """Compresses channels and halves the spatial size."""
    x = self.act(self.norm(name="norm")(x))
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
    conv: the convolution, called as conv(features, kernel_size, strides=..., name=...);
      given dtype, param_dtype, no bias and He-normal init unless its partial sets them
      (nn.Conv works).
    norm: the normalisation, called as norm(name=...)(x); given dtype, param_dtype and
      bn_epsilon, and a batch norm (one with `use_running_average`) also train/eval,
      bn_momentum and bn_axis_name, unless its partial sets them (nn.BatchNorm and
      nn.GroupNorm work; only `BatchNorm` shares moments within a block).
    act: the activation after every norm.
    matmul_1x1: run 1x1 convolutions as matmuls.
    layer_barrier: an optimization barrier before every dense layer of a concatenating block.
    block_buffer: each dense block's maps in one buffer with a custom backward pass
      (densenet_jax.buffer); `memory_efficient` then also recomputes each bottleneck.
    For these three, None (the default) takes the choice of the platform the model is compiled
    for (densenet_jax.backends says why each backend wants what), also when that platform is
    not the one this Python process runs on (ahead-of-time compilation for a TPU or GPU).
    unroll_layers: compile each layer of a one-buffer block on its own instead of one loop body
      per run of layers that read the same number of 128-lane tiles: the same computation,
      slower to compile, and what `train.plan` reads flops and bytes from (XLA's cost
      analysis counts a loop body once).
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
  conv: ModuleDef = Conv
  norm: ModuleDef = BatchNorm
  act: Callable[[Array], Array] = nn.relu
  matmul_1x1: bool | None = None
  layer_barrier: bool | None = None
  block_buffer: bool | None = None
  unroll_layers: bool = False

  def __post_init__(self) -> None:
    _check_config(self)
    super().__post_init__()

  @property
  def depth(self) -> int:
    """L in the paper: convolutional and fully connected layers on the main path."""
    convs_per_layer = 1 if self.bn_size is None else 2
    return 1 + convs_per_layer * sum(self.block_config) + len(self.block_config) - 1 + 1

  @nn.nowrap
  def init(self, rngs: Any, *args: Any, **kwargs: Any) -> Any:
    """`nn.Module.init`, compiled as one program.

    Run eagerly, init dispatches the forward pass op by op and XLA compiles each of its ~1,000
    differently shaped ops; as one program the forward is dead code and only the initialisers
    are compiled (benchmarks/init_compile.py times both). Non-array arguments (e.g. `train`)
    stay static.
    """
    static = tuple(i + 1 for i, a in enumerate(args)
                   if not isinstance(a, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)))
    run = functools.partial(super().init, **kwargs)
    return jax.jit(run, static_argnums=static)(rngs, *args)

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
    host = backends.fast_path().model_choices()
    open_choices = {k for k in host if getattr(self, k) is None}
    # Initialising creates the same variables whatever the choices, and flax captures the
    # intermediates of this apply's own modules only: both take the host's choices.
    if (open_choices and not self.is_initializing()
        and not self.is_mutable_collection("intermediates")):
      return self._per_platform(x, train, open_choices)
    choices = {k: host[k] if k in open_choices else getattr(self, k) for k in host}
    conv = layers.configure(
        self.conv, dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False,
        kernel_init=he_normal, matmul_1x1=choices["matmul_1x1"])
    norm_options = dict(dtype=self.dtype, param_dtype=self.param_dtype, epsilon=self.bn_epsilon)
    if "use_running_average" in layers.fields(self.norm):  # batch statistics, not per example
      norm_options |= dict(use_running_average=not train, momentum=self.bn_momentum,
                           axis_name=self.bn_axis_name)
    norm = layers.configure(self.norm, **norm_options)
    act = self.act
    x = jnp.asarray(x, self.dtype)
    if self.stem == "imagenet":
      # torchvision's symmetric padding ('SAME' would pad this stride-2 conv asymmetrically)
      x = conv(self.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
               name="conv0")(x)
      x = act(norm(name="norm0")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.num_init_features, (3, 3), name="conv0")(x)
    stages = {"stem": x}

    channels = self.block_channels()
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers=num_layers, growth_rate=self.growth_rate, bn_size=self.bn_size,
                     drop_rate=self.drop_rate, memory_efficient=self.memory_efficient, conv=conv,
                     norm=norm, act=act, layer_barrier=choices["layer_barrier"],
                     buffer=choices["block_buffer"], buffer_unroll=self.unroll_layers,
                     name=f"denseblock{i + 1}")(x, train)
      stages[f"block{i + 1}"] = x
      if i < len(self.block_config) - 1:
        x = Transition(out_channels=channels[i][1], drop_rate=self.drop_rate, conv=conv,
                       norm=norm, act=act, name=f"transition{i + 1}")(x, train)
    if self.features_only:
      return stages

    x = jnp.mean(act(norm(name="norm_final")(x)), axis=(1, 2))
    if self.num_classes == 0:
      return x
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=quick_to_compile(nn.initializers.lecun_normal()),
                    bias_init=nn.initializers.zeros, name="classifier")(x)

  def _per_platform(self, x: Array, train: bool,
                    open_choices: set[str]) -> Array | dict[str, Array]:
    """This model with the open choices of the platform it is compiled for.

    `jax.lax.platform_dependent` traces one copy of the model per distinct set of choices and
    keeps, when lowering, only the copy of the target platform: a model compiled ahead of time
    for a TPU from a CPU host gets the TPU's choices (`jax.default_backend()` would give the
    host's).
    """
    mutable = self.scope.mutable
    rng = self.make_rng("dropout") if train and self.drop_rate > 0.0 else None

    def with_choices(choices: dict[str, bool]) -> Callable[..., Any]:
      model = self.clone(parent=None, **{k: choices[k] for k in open_choices})

      def run(variables: Any, x: Array, rng: Array | None) -> Any:
        return model.apply(variables, x, train, mutable=mutable,
                           rngs={} if rng is None else {"dropout": rng})

      return run

    # One branch per distinct set of choices (each is traced); platforms whose choices are the
    # GPU's take the default branch, which any platform not named in the table also takes.
    branches: dict[tuple[bool, ...], Callable[..., Any]] = {}

    def branch(kind: str) -> Callable[..., Any]:
      choices = backends.FAST_PATHS[kind].model_choices()
      key = tuple(choices[k] for k in sorted(open_choices))
      if key not in branches:
        branches[key] = with_choices(choices)
      return branches[key]

    default = branch("gpu")
    per_platform = {platform: branch(kind) for kind in backends.FAST_PATHS
                    for platform in backends.PLATFORMS[kind] if branch(kind) is not default}
    out = jax.lax.platform_dependent(dict(self.variables), x, rng, default=default,
                                     **per_platform)
    if mutable is False:
      return out
    out, updates = out
    for col, tree in updates.items():
      for name, value in tree.items():
        self.put_variable(col, name, value)
    return out

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


def preset(name: str, doc: str, build: Callable[..., DenseNet],
           **defaults: Any) -> Callable[..., DenseNet]:
  """Registers `build(**defaults)` under `name`; keyword arguments override the defaults."""

  def make(**kwargs: Any) -> DenseNet:
    return build(**(defaults | kwargs))

  make.__name__ = make.__qualname__ = name
  make.__doc__ = doc
  _REGISTRY[name] = make
  return make


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


# The paper's nets (Table 1 and Table 2), in paper order.
densenet40 = preset("densenet40", "DenseNet (L=40, k=12), 1.0M parameters.",
                    densenet_cifar, depth=40, growth_rate=12, bottleneck=False)
densenet100_k12 = preset("densenet100_k12", "DenseNet (L=100, k=12), 7.0M parameters.",
                         densenet_cifar, depth=100, growth_rate=12, bottleneck=False)
densenet100_k24 = preset("densenet100_k24", "DenseNet (L=100, k=24), 27.2M parameters.",
                         densenet_cifar, depth=100, growth_rate=24, bottleneck=False)
densenet_bc_100 = preset("densenet_bc_100", "DenseNet-BC (L=100, k=12), 0.8M parameters.",
                         densenet_cifar, depth=100, growth_rate=12)
densenet_bc_250 = preset("densenet_bc_250", "DenseNet-BC (L=250, k=24), 15.3M parameters.",
                         densenet_cifar, depth=250, growth_rate=24)
densenet_bc_190 = preset("densenet_bc_190", "DenseNet-BC (L=190, k=40), 25.6M parameters.",
                         densenet_cifar, depth=190, growth_rate=40)
densenet_bc = preset("densenet_bc", "DenseNet-BC of any depth L ((L-4)/6 layers per block) and "
                     "growth rate k; 100 and 12 by default.", densenet_cifar, depth=100,
                     growth_rate=12)
densenet121 = preset("densenet121", "DenseNet-121 (k=32), 7,978,856 parameters.",
                     densenet_imagenet, block_config=(6, 12, 24, 16))
densenet161 = preset("densenet161", "DenseNet-161 (k=48, 96-channel stem), 28,681,000 "
                     "parameters.", densenet_imagenet, block_config=(6, 12, 36, 24),
                     growth_rate=48)
densenet169 = preset("densenet169", "DenseNet-169 (k=32), 14,149,480 parameters.",
                     densenet_imagenet, block_config=(6, 12, 32, 32))
densenet201 = preset("densenet201", "DenseNet-201 (k=32), 20,013,928 parameters.",
                     densenet_imagenet, block_config=(6, 12, 48, 32))
densenet264 = preset("densenet264", "DenseNet-264 (k=32); the paper's name, though the layer "
                     "count is 265.", densenet_imagenet, block_config=(6, 12, 64, 48))


def native_input_shape(model: DenseNet, batch_size: int = 1) -> tuple[int, int, int, int]:
  """The input shape a preset was designed for: 32x32 (CIFAR stem) or 224x224."""
  size = 32 if model.stem == "cifar" else 224
  return (batch_size, size, size, model.in_channels)


def abstract_variables(model: DenseNet, input_shape: Sequence[int]) -> Any:
  """The model's variables as jax.ShapeDtypeStructs (an eval-mode init that computes nothing)."""
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(input_shape)))


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (BatchNorm running statistics excluded)."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
