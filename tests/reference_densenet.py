"""A textbook DenseNet: concatenate, nn.BatchNorm, nn.Conv, nothing else.

The library's model computes the same function with shared BatchNorm moments, 1x1
convolutions as matmuls and a gradient chain through each block; the tests hold it equal
to this reference (same parameter tree, same outputs, gradients and statistics).
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from densenet_jax import models


def _pad(kernel):
  return [(k // 2, k // 2) for k in kernel]


class ReferenceDenseNet(nn.Module):
  """Computes `spec` (a models.DenseNet) the way the paper describes it."""

  spec: models.DenseNet

  @nn.compact
  def __call__(self, x, train=False):
    s = self.spec
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=s.bn_momentum,
                             epsilon=s.bn_epsilon, dtype=s.dtype, param_dtype=s.param_dtype,
                             axis_name=s.bn_axis_name)
    conv = functools.partial(nn.Conv, use_bias=False, dtype=s.dtype, param_dtype=s.param_dtype,
                             kernel_init=models.he_normal)

    def dropout(x):
      return nn.Dropout(s.drop_rate, deterministic=not train)(x) if s.drop_rate else x

    x = jnp.asarray(x, s.dtype)
    if s.stem == "imagenet":
      x = conv(s.num_init_features, (7, 7), (2, 2), _pad((7, 7)), name="conv0")(x)
      x = nn.relu(norm(name="norm0")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(s.num_init_features, (3, 3), padding=_pad((3, 3)), name="conv0")(x)
    for b, num_layers in enumerate(s.block_config):
      block = f"denseblock{b + 1}"
      features = [x]
      for i in range(num_layers):
        layer = f"{block}/denselayer{i + 1}"
        kernel = (3, 3) if s.bn_size is None else (1, 1)
        width = s.growth_rate if s.bn_size is None else s.bn_size * s.growth_rate
        y = nn.relu(norm(name=f"{layer}/norm1")(jnp.concatenate(features, axis=-1)))
        y = dropout(conv(width, kernel, padding=_pad(kernel), name=f"{layer}/conv1")(y))
        if s.bn_size is not None:
          y = nn.relu(norm(name=f"{layer}/norm2")(y))
          y = dropout(conv(s.growth_rate, (3, 3), padding=_pad((3, 3)), name=f"{layer}/conv2")(y))
        features.append(y)
      x = jnp.concatenate(features, axis=-1)
      if b < len(s.block_config) - 1:
        x = nn.relu(norm(name=f"transition{b + 1}/norm")(x))
        x = dropout(conv(s.block_channels()[b][1], (1, 1), name=f"transition{b + 1}/conv")(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(norm(name="norm_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(s.num_classes, dtype=s.dtype, param_dtype=s.param_dtype, name="classifier")(x)


def nest(tree):
  """{'a/b': v} -> {'a': {'b': v}} (the reference names modules by path)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = nest(value)
  return out


def flatten(tree):
  """Inverse of `nest` for the reference's variable collections."""
  out = {}
  for collection, modules in tree.items():
    out[collection] = {}
    for path, value in _paths(modules):
      out[collection][path] = value
  return out


def _paths(tree, prefix=""):
  for key, value in tree.items():
    if isinstance(value, dict) and not any(not isinstance(v, dict) for v in value.values()):
      yield from _paths(value, f"{prefix}{key}/")
    else:
      yield f"{prefix}{key}", value
