"""The one-buffer dense block (densenet_jax.buffer): its custom backward pass is the gradient.

tests/reference_test.py holds whole models with `block_buffer=True` equal to the textbook
DenseNet in float32; here one block's custom VJP is compared in float64, where rounding
cannot hide an error, against autodiff of the concatenating block, and against finite
differences where dropout makes the layers random.
"""

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from densenet_jax import layers, models, summary


def block(buffer, norm=layers.BatchNorm, bn_size=4, memory_efficient=False, drop_rate=0.0,
          axis_name=None, train=True, dtype=jnp.float64, lanes=8, num_layers=4):
  norm = layers.configure(norm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                          dtype=dtype, param_dtype=dtype, axis_name=axis_name)
  conv = layers.configure(layers.Conv, dtype=dtype, param_dtype=dtype,
                          kernel_init=models.he_normal)
  return models.DenseBlock(num_layers=num_layers, growth_rate=3, bn_size=bn_size,
                           drop_rate=drop_rate, memory_efficient=memory_efficient, conv=conv,
                           norm=norm, act=nn.relu, buffer=buffer, buffer_lanes=lanes)


def randomised(variables, key):
  """Variables with random BN scale/bias and running statistics."""
  leaves, tree = jax.tree_util.tree_flatten(variables)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      leaf + jax.random.uniform(k, leaf.shape, leaf.dtype, 0.0, 0.5)
      for leaf, k in zip(leaves, keys)])


def loss_and_grads(model, variables, x, train=True, rngs=None):
  """A weighted sum of the block's output, its new statistics, and d/d(params, x)."""
  weights = jnp.cos(jnp.arange(x.shape[-1] + model.num_layers * model.growth_rate))

  def loss(params, x):
    y, state = model.apply({**variables, "params": params}, x, train, mutable=["batch_stats"],
                           rngs=rngs or {})
    return jnp.sum(jnp.tanh(y) * weights), state

  (value, state), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      variables["params"], x)
  return value, state, grads


CASES = {
    "bottleneck": {},
    "bottleneck_recomputed": dict(memory_efficient=True),
    "basic": dict(bn_size=None),
    "basic_recomputed": dict(bn_size=None, memory_efficient=True),
    "flax_batchnorm": dict(norm=nn.BatchNorm),
    "group_norm": dict(norm=functools.partial(nn.GroupNorm, num_groups=None, group_size=1)),
}


# The block's 5 + 4 * 3 channels: with 8 lanes, layers 1-2 (prefixes of 5 and 8 channels) run
# as one loop body on 8 channels, layers 3-4 (11 and 14) on 16; with 128, all four on all 17;
# with 1, each layer reads its own prefix.
@pytest.mark.parametrize("case,train,lanes", [
    ("bottleneck", True, 8),
    *(pytest.param("bottleneck", True, n, marks=pytest.mark.slow) for n in (1, 128)),
    *(pytest.param(c, t, 8, marks=pytest.mark.slow) for c in CASES for t in (True, False)
      if (c, t) != ("bottleneck", True))])
def test_custom_vjp_equals_autodiff_of_the_concatenating_block_in_float64(case, train, lanes):
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 5), jnp.float64)
    concatenating, buffered = (block(b, train=train, lanes=lanes, **CASES[case])
                               for b in (False, True))
    v = randomised(concatenating.init(jax.random.key(1), x, train), jax.random.key(2))
    want = loss_and_grads(concatenating, v, x, train)
    got = loss_and_grads(buffered, v, x, train)
    assert got[2][1].dtype == jnp.float64
    chex.assert_trees_all_close(got, want, rtol=1e-11, atol=1e-13)
    assert float(jnp.abs(want[2][1]).max()) > 1e-3  # the input gradient is not trivially 0


@pytest.mark.slow
def test_custom_vjp_with_dropout_equals_finite_differences():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 4), jnp.float64)
    model = block(True, drop_rate=0.3)
    v = randomised(model.init(jax.random.key(1), x, False), jax.random.key(2))

    def f(params, x):
      y, _ = model.apply({**v, "params": params}, x, True, mutable=["batch_stats"],
                         rngs={"dropout": jax.random.key(5)})
      return jnp.sum(jnp.tanh(y))

    check_grads(f, (v["params"], x), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
    # dropout is on: a second key changes the output
    y1, y2 = (model.apply(v, x, True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(k)})[0]
              for k in (5, 6))
    assert not np.allclose(y1, y2)


@pytest.mark.slow
def test_synchronised_batchnorm_under_vmap_equals_the_concatenating_block():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 3, 6, 6, 5), jnp.float64)
    results = []
    for buffer in (False, True):
      model = block(buffer, axis_name="replica")
      v = randomised(model.init(jax.random.key(1), x[0], True), jax.random.key(2))
      results.append(jax.vmap(lambda xs, model=model, v=v: loss_and_grads(model, v, xs),
                              axis_name="replica")(x))
    chex.assert_trees_all_close(results[1], results[0], rtol=1e-11, atol=1e-13)


def test_each_layer_reads_a_prefix_of_one_buffer_and_concatenates_nothing():
  x = jnp.zeros((2, 6, 6, 5))
  text = {}
  for buffer in (False, True):
    model = block(buffer, dtype=jnp.float32, lanes=1)
    v = model.init(jax.random.key(1), x, True)
    text[buffer] = jax.jit(lambda v, x, model=model: loss_and_grads(model, v, x)).lower(
        v, x).as_text()
  channels = re.compile(r"stablehlo\.concatenate .*dim = 3")  # NHWC maps along channels
  assert channels.search(text[False])
  assert not channels.search(text[True])
  assert text[True].count("dynamic_update_slice") >= 2 * 4  # each map written, each gradient added


def test_the_layers_of_one_lane_group_compile_as_one_loop_body():
  x = jnp.zeros((2, 6, 6, 5))

  def lowered(num_layers):
    model = block(True, dtype=jnp.float32, lanes=128, num_layers=num_layers)
    v = model.init(jax.random.key(1), x, True)
    return jax.jit(lambda v, x: loss_and_grads(model, v, x)).lower(v, x).as_text()

  short, long = lowered(4), lowered(8)
  # all layers of either block read one 128-lane prefix: one forward and one backward loop, and
  # as many convolutions in the program for 8 layers as for 4
  assert short.count("stablehlo.while") == long.count("stablehlo.while") == 2
  assert short.count("stablehlo.convolution") == long.count("stablehlo.convolution")


def test_the_choices_follow_the_platform_the_model_is_compiled_for():
  pytest.importorskip("libtpu")
  from jax.experimental.topologies import get_topology_desc  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  model = models.densenet_cifar(depth=10, growth_rate=4, num_classes=5)  # choices left open
  x = jnp.zeros((2, 8, 8, 3))
  v = model.init(jax.random.key(0), x)
  step = jax.jit(jax.grad(lambda p, bs, x: summary.train_loss(model, p, bs, x, jnp.zeros(2, int))[0]))
  on_host = step.lower(v["params"], v["batch_stats"], x).as_text()
  tpu = get_topology_desc("v5e:1x1", "tpu").devices
  replicated = NamedSharding(Mesh(np.asarray(tpu), ("d",)), P())
  as_tpu = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
      (v["params"], v["batch_stats"], x))
  for_tpu = step.lower(*as_tpu).as_text()
  # the host (CPU) keeps a barrier per dense layer and concatenates; the TPU's one-buffer block
  # writes each map into its block's buffer
  channels = re.compile(r"stablehlo\.concatenate .*dim = 3")
  assert "optimization_barrier" in on_host and channels.search(on_host)
  assert "optimization_barrier" not in for_tpu and not channels.search(for_tpu)
