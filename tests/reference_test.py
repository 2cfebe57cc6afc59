"""The library's DenseNet equals the textbook one (tests/reference_densenet.py).

The library computes BatchNorm moments once per feature map, runs 1x1 convolutions as
matmuls and chains gradients through each block; none of that may change the function. Built
from plain nn.BatchNorm and nn.Conv instead (the straightforward path) it is the same too.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_densenet import ReferenceDenseNet, flatten, nest

from densenet_jax import models, summary

CASES = {
    "bc": dict(depth=22, growth_rate=4, num_classes=5),
    "bc_memory_efficient": dict(depth=22, growth_rate=4, num_classes=5, memory_efficient=True),
    "basic": dict(depth=13, growth_rate=6, bottleneck=False, num_classes=5),
    "basic_memory_efficient": dict(depth=13, growth_rate=6, bottleneck=False, num_classes=5,
                                   memory_efficient=True),
    "bc_plain_flax_modules": dict(depth=22, growth_rate=4, num_classes=5, norm=nn.BatchNorm,
                                  conv=nn.Conv),
    "bc_plain_flax_modules_memory_efficient": dict(depth=22, growth_rate=4, num_classes=5,
                                                   norm=nn.BatchNorm, conv=nn.Conv,
                                                   memory_efficient=True),
    "bc_convolutions_not_matmuls": dict(depth=22, growth_rate=4, num_classes=5,
                                        conv=functools.partial(models.Conv, matmul_1x1=False)),
    # the accelerator fast path (densenet_jax.backends): no per-layer barrier, 1x1
    # convolutions, each block as one buffer with its custom backward pass
    "bc_accelerator_fast_path": dict(depth=22, growth_rate=4, num_classes=5, matmul_1x1=False,
                                     layer_barrier=False, block_buffer=True),
    "bc_accelerator_fast_path_memory_efficient": dict(
        depth=22, growth_rate=4, num_classes=5, matmul_1x1=False, layer_barrier=False,
        block_buffer=True, memory_efficient=True),
    "bc_buffer_plain_flax_modules": dict(depth=22, growth_rate=4, num_classes=5,
                                         norm=nn.BatchNorm, conv=nn.Conv, block_buffer=True),
    "basic_buffer": dict(depth=13, growth_rate=6, bottleneck=False, num_classes=5,
                         block_buffer=True),
    "basic_buffer_memory_efficient": dict(depth=13, growth_rate=6, bottleneck=False,
                                          num_classes=5, block_buffer=True,
                                          memory_efficient=True),
    "bc_concatenating_blocks": dict(depth=22, growth_rate=4, num_classes=5, block_buffer=False),
}
IMAGENET = {"imagenet": {}, "imagenet_plain_flax_modules": dict(norm=nn.BatchNorm, conv=nn.Conv),
            "imagenet_buffer": dict(block_buffer=True)}


def _models(case):
  if case in IMAGENET:
    model = models.densenet_imagenet((2, 3, 2, 2), growth_rate=4, num_classes=5, **IMAGENET[case])
    return model, jax.random.normal(jax.random.key(3), (4, 64, 64, 3))
  model = models.densenet_cifar(**CASES[case])
  return model, jax.random.normal(jax.random.key(3), (8, 16, 16, 3))


def _randomised_variables(model, x):
  """Init, then random BN scale/bias and running statistics so every path is exercised."""
  v = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
  leaves, tree = jax.tree_util.tree_flatten_with_path(v)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys):
    name = jax.tree_util.keystr(path)
    noise = jax.random.uniform(key, leaf.shape, minval=0.5, maxval=1.5)
    if "'var'" in name or "'scale'" in name:
      leaf = leaf * 0 + noise
    elif "'mean'" in name or "'bias'" in name:
      leaf = leaf + noise - 1.0
    out.append(leaf)
  return jax.tree_util.tree_unflatten(tree, out)


FAST = ("bc", "bc_accelerator_fast_path")


@pytest.mark.parametrize("case", [*FAST, *(pytest.param(c, marks=pytest.mark.slow)
                                          for c in [*CASES, *IMAGENET] if c not in FAST)])
def test_library_equals_textbook_densenet(case):
  model, x = _models(case)
  reference = ReferenceDenseNet(model)
  v = _randomised_variables(model, x)
  ref_shapes = jax.eval_shape(lambda: reference.init(jax.random.key(0), x))
  chex.assert_trees_all_equal_shapes(flatten(v), ref_shapes)
  labels = jnp.arange(x.shape[0]) % 5

  def ref_loss(params, batch_stats):
    flat = flatten({"params": params, "batch_stats": batch_stats})
    loss, state = summary.train_loss(reference, flat["params"], flat["batch_stats"], x, labels)
    return loss, nest(state)

  lib_loss = functools.partial(summary.train_loss, model)
  (l0, s0), g0 = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(
      v["params"], v["batch_stats"])
  (l1, s1), g1 = jax.jit(jax.value_and_grad(lib_loss, has_aux=True))(
      v["params"], v["batch_stats"], x, labels)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  chex.assert_trees_all_close(s1, s0, rtol=1e-5, atol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g0))
  chex.assert_trees_all_close(g1, g0, rtol=1e-4, atol=1e-5 * scale)
  assert float(jnp.max(jnp.abs(s1["batch_stats"]["denseblock1"]["denselayer2"]["norm1"]["mean"]
                               - v["batch_stats"]["denseblock1"]["denselayer2"]["norm1"]["mean"]))) > 0

  ref_eval = jax.jit(lambda v, x: reference.apply(flatten(v), x))(v, x)
  lib_eval = jax.jit(lambda v, x: model.apply(v, x))(v, x)
  np.testing.assert_allclose(lib_eval, ref_eval, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_library_equals_textbook_densenet_in_bfloat16():
  model, x = _models("bc")
  model = model.clone(dtype=jnp.bfloat16)
  reference = ReferenceDenseNet(model)
  v = _randomised_variables(model, x)
  ref, ref_state = jax.jit(lambda v, x: reference.apply(flatten(v), x, train=True,
                                                        mutable=["batch_stats"]))(v, x)
  lib, lib_state = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                    mutable=["batch_stats"]))(v, x)
  assert lib.dtype == ref.dtype == jnp.bfloat16
  # bfloat16 has 8 mantissa bits: a different summation order moves logits by a few ulps.
  np.testing.assert_allclose(lib.astype(jnp.float32), ref.astype(jnp.float32), rtol=0.05,
                             atol=0.05)
  chex.assert_trees_all_close(lib_state, nest(ref_state), rtol=2e-2, atol=2e-2)


@pytest.mark.slow
def test_library_equals_textbook_densenet_with_synced_batchnorm():
  model, x = _models("bc_memory_efficient")
  model = model.clone(bn_axis_name="replica")
  reference = ReferenceDenseNet(model)
  v = _randomised_variables(model, x)
  shards = x.reshape(2, 4, *x.shape[1:])
  run = lambda f: jax.jit(jax.vmap(f, axis_name="replica"))(shards)
  lib, lib_state = run(lambda xs: model.apply(v, xs, train=True, mutable=["batch_stats"]))
  ref, ref_state = run(lambda xs: reference.apply(flatten(v), xs, train=True,
                                                  mutable=["batch_stats"]))
  np.testing.assert_allclose(lib, ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lib_state, nest(ref_state), rtol=1e-5, atol=1e-6)
