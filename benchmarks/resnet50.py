"""ResNet-50 (v1.5: the stride on the 3x3 convolution), the reference for DenseNet-121's bytes.

A plain flax ResNet-50 as the flax ImageNet example and MLPerf train it (NHWC, BatchNorm
momentum 0.9 and epsilon 1e-5, the last BatchNorm of each residual branch initialised to zero),
called like `densenet_jax.models.DenseNet`: `model.apply(variables, x, train=...)`.
`benchmarks/accelerator_plan.py --variant resnet50` plans it with the trainer's own step.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (4x wider) with a projection shortcut where shapes change."""

  filters: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    """The block's output: relu(branch(x) + shortcut(x))."""
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)))(y)))
    y = norm(scale_init=nn.initializers.zeros)(conv(4 * self.filters, (1, 1))(y))
    if x.shape[-1] != 4 * self.filters or self.strides != 1:
      x = norm()(conv(4 * self.filters, (1, 1), strides=self.strides)(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 for NHWC images: logits (N, num_classes)."""

  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Logits of `x`."""
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(64, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate((3, 4, 6, 3)):
      for block in range(blocks):
        x = Bottleneck(64 * 2 ** stage, 2 if stage > 0 and block == 0 else 1, self.dtype)(
            x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x)
