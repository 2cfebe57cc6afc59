"""Tests of the DenseNet model library: architecture, numerics, knobs and errors."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from densenet_jax import backends, models, summary

EXACT_PARAMS = {
    ("densenet_bc_100", 10): 769_162,
    ("densenet_bc_100", 100): 800_032,
    ("densenet121", 1000): 7_978_856,
    ("densenet169", 1000): 14_149_480,
    ("densenet201", 1000): 20_013_928,
    ("densenet161", 1000): 28_681_000,
}
PAPER_DEPTH_PARAMS_M = {  # Table 2: depth L and parameters rounded to 0.1M
    "densenet40": (40, 1.0),
    "densenet100_k12": (100, 7.0),
    "densenet100_k24": (100, 27.2),
    "densenet_bc_100": (100, 0.8),
    "densenet_bc_250": (250, 15.3),
    "densenet_bc_190": (190, 25.6),
}


def tiny(**kw):
  """A 3-block BC net small enough for real compute in tests."""
  args = dict(depth=22, growth_rate=4, num_classes=5)
  args.update(kw)
  return models.densenet_cifar(**args)


def images(shape=(4, 16, 16, 3), seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def init(model, x):
  """Jitted init: one compiled program instead of hundreds of eager op compilations."""
  return jax.jit(lambda x: model.init(jax.random.key(0), x))(x)


def apply(model, v, x, train=False, rng=None):
  """Jitted apply; in training also returns the updated batch_stats."""
  rngs = {} if rng is None else {"dropout": rng}
  if train:
    return jax.jit(lambda v, x, rngs: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                  rngs=rngs))(v, x, rngs)
  return jax.jit(lambda v, x: model.apply(v, x))(v, x)


@pytest.mark.parametrize("name,classes", sorted(EXACT_PARAMS))
def test_exact_parameter_counts(name, classes):
  model = models.get_model(name, num_classes=classes)
  v = models.abstract_variables(model, models.native_input_shape(model))
  assert models.count_params(v["params"]) == EXACT_PARAMS[(name, classes)]


@pytest.mark.parametrize("name", sorted(PAPER_DEPTH_PARAMS_M))
def test_paper_depth_and_parameter_counts_to_rounding(name):
  depth, params_m = PAPER_DEPTH_PARAMS_M[name]
  model = models.get_model(name)
  v = models.abstract_variables(model, models.native_input_shape(model))
  assert round(models.count_params(v["params"]) / 1e6, 1) == params_m
  assert model.depth == depth


def test_registry_lists_every_paper_preset():
  assert set(models.list_models()) == {
      "densenet40", "densenet100_k12", "densenet100_k24", "densenet_bc_100",
      "densenet_bc_250", "densenet_bc_190", "densenet121", "densenet161", "densenet169",
      "densenet201", "densenet264", "densenet_bc"}
  assert models.get_model("densenet_bc", depth=40).depth == 40
  assert models.get_model("densenet121", num_classes=7).num_classes == 7
  with pytest.raises(ValueError, match="Unknown model 'resnet50'.*densenet121"):
    models.get_model("resnet50")


@pytest.mark.slow
@pytest.mark.parametrize("name", models.list_models())
def test_output_shapes_every_preset(name):
  model = models.get_model(name)
  shape = models.native_input_shape(model, batch_size=2)
  v = models.abstract_variables(model, shape)
  logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), v)
  assert logits.shape == (2, model.num_classes)
  final_channels = model.block_channels()[-1][0]
  pooled = jax.eval_shape(lambda v: model.clone(num_classes=0).apply(v, jnp.zeros(shape)), v)
  assert pooled.shape == (2, final_channels)


@pytest.mark.parametrize("name,expected", [
    # (stem channels, [(block out, transition out), ...]) worked out by hand from the paper.
    ("densenet_bc_100", (24, [(216, 108), (300, 150), (342, 342)])),
    ("densenet40", (16, [(160, 160), (304, 304), (448, 448)])),
    ("densenet121", (64, [(256, 128), (512, 256), (1024, 512), (1024, 1024)])),
])
def test_dense_connectivity_channel_counts(name, expected):
  stem_channels, blocks = expected
  model = models.get_model(name, features_only=True)
  assert model.block_channels() == blocks
  shape = models.native_input_shape(model, batch_size=1)
  v = models.abstract_variables(model, shape)
  stages = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), v)
  assert stages["stem"].shape[-1] == stem_channels
  for i, (block_out, _) in enumerate(blocks):
    assert stages[f"block{i + 1}"].shape[-1] == block_out
  # Layer l of a block sees m0 + (l - 1) * k input channels.
  block2 = v["params"]["denseblock2"]
  for l in range(1, model.block_config[1] + 1):
    assert block2[f"denselayer{l}"]["norm1"]["scale"].shape == (
        blocks[0][1] + (l - 1) * model.growth_rate,)


def test_block_output_concatenates_its_input():
  model = tiny(features_only=True)
  x = images()
  stages = apply(model, init(model, x), x)
  m0 = model.num_init_features
  np.testing.assert_array_equal(stages["block1"][..., :m0], stages["stem"])
  assert stages["block1"].shape[1:3] == (16, 16)
  assert stages["block2"].shape[1:3] == (8, 8)
  assert stages["block3"].shape[1:3] == (4, 4)


@pytest.mark.slow
class JitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_and_eager_agree(self):
    model = tiny()
    x = images()
    v = init(model, x)

    @self.variant
    def train_forward(v, x):
      return model.apply(v, x, train=True, mutable=["batch_stats"])

    logits, new_state = train_forward(v, x)
    ref_logits, ref_state = model.apply(v, x, train=True, mutable=["batch_stats"])
    chex.assert_trees_all_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5, atol=1e-6)


def test_batchnorm_statistics_update_only_in_training():
  model = tiny()
  x = images()
  v = init(model, x)
  _, train_state = apply(model, v, x, train=True)
  _, eval_state = jax.jit(lambda v, x: model.apply(v, x, mutable=["batch_stats"]))(v, x)
  chex.assert_trees_all_equal(eval_state["batch_stats"], v["batch_stats"])
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   train_state["batch_stats"], v["batch_stats"])
  assert all(jax.tree_util.tree_leaves(changed))
  # torch momentum 0.1: running = 0.9 * running + 0.1 * batch mean.
  stem = apply(model.clone(features_only=True), v, x)["stem"]
  batch_mean = stem.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(
      train_state["batch_stats"]["denseblock1"]["denselayer1"]["norm1"]["mean"],
      0.1 * batch_mean, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_dropout_only_in_training():
  model = tiny(drop_rate=0.2)
  x = images((2, 8, 8, 3))
  v = init(model, x)
  a, _ = apply(model, v, x, train=True, rng=jax.random.key(1))
  b, _ = apply(model, v, x, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(apply(model, v, x), apply(tiny(), v, x))
  no_dropout, _ = apply(tiny(), v, x, train=True)
  assert not np.allclose(a, no_dropout)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_stats():
  model = tiny(dtype=jnp.bfloat16)
  x = images((2, 8, 8, 3))
  v = init(model, x)
  assert {p.dtype for p in jax.tree_util.tree_leaves(v)} == {jnp.dtype(jnp.float32)}
  logits, state = apply(model, v, x, train=True)
  assert logits.dtype == jnp.bfloat16
  assert {s.dtype for s in jax.tree_util.tree_leaves(state)} == {jnp.dtype(jnp.float32)}
  stages = apply(model.clone(features_only=True), v, x)
  assert {s.dtype for s in stages.values()} == {jnp.dtype(jnp.bfloat16)}
  np.testing.assert_allclose(apply(model, v, x).astype(jnp.float32), apply(tiny(), v, x),
                             atol=0.05, rtol=0.05)


def test_initialisation_follows_torchvision():
  model = tiny(growth_rate=12)
  p = init(model, jnp.zeros((1, 16, 16, 3)))["params"]
  kernel = p["denseblock2"]["denselayer3"]["conv2"]["kernel"]  # 3x3, fan_in 9 * 48
  np.testing.assert_allclose(jnp.std(kernel), np.sqrt(2.0 / (9 * 48)), rtol=0.05)
  # Untruncated normal: tails beyond 2 sigma exist (a truncated init has none).
  assert jnp.max(jnp.abs(kernel)) > 2.5 * np.sqrt(2.0 / (9 * 48))
  norm = p["denseblock1"]["denselayer1"]["norm1"]
  np.testing.assert_array_equal(norm["scale"], 1.0)
  np.testing.assert_array_equal(norm["bias"], 0.0)
  np.testing.assert_array_equal(p["classifier"]["bias"], 0.0)
  assert model.bn_epsilon == 1e-5 and model.bn_momentum == 0.9


@pytest.mark.slow
def test_memory_efficient_matches_default_outputs_and_gradients():
  x = images((8, 16, 16, 3))
  default, efficient = tiny(drop_rate=0.0), tiny(memory_efficient=True)
  v = init(default, x)
  chex.assert_trees_all_equal_shapes(v, models.abstract_variables(efficient, x.shape))
  labels = jnp.arange(8) % 5
  grads = [jax.jit(jax.grad(functools.partial(summary.train_loss, m), has_aux=True))(
      v["params"], v["batch_stats"], x, labels) for m in (default, efficient)]
  (g0, state0), (g1, state1) = grads
  chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(state1, state0, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(apply(efficient, v, x, train=True)[0],
                              apply(default, v, x, train=True)[0], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(jax.tree_util.tree_leaves(g0)[0]).sum()) > 0


@pytest.mark.slow
def test_memory_efficient_lowers_compiled_temp_memory():
  shape = (16, 32, 32, 3)
  default = summary.train_step_temp_bytes(models.densenet_cifar(58, 12), shape)
  efficient = summary.train_step_temp_bytes(models.densenet_cifar(58, 12, memory_efficient=True),
                                            shape)
  assert efficient < 0.75 * default, (efficient, default)


@pytest.mark.slow
def test_bn_axis_name_gives_cross_replica_statistics():
  x = images((8, 16, 16, 3))
  model = tiny()
  v = init(model, x)
  full, full_state = apply(model, v, x, train=True)
  synced = model.clone(bn_axis_name="replica")
  sharded, sharded_state = jax.jit(jax.vmap(
      lambda xs: synced.apply(v, xs, train=True, mutable=["batch_stats"]),
      axis_name="replica"))(x.reshape(2, 4, 16, 16, 3))
  np.testing.assert_allclose(sharded.reshape(8, -1), full, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(jax.tree_util.tree_map(lambda s: s[0], sharded_state), full_state,
                              rtol=1e-4, atol=1e-6)
  local, _ = jax.jit(jax.vmap(
      lambda xs: model.apply(v, xs, train=True, mutable=["batch_stats"])))(
          x.reshape(2, 4, 16, 16, 3))
  assert not np.allclose(local.reshape(8, -1), full, atol=1e-3)


# ------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("shape,match", [
    ((32, 32, 3), r"NHWC.*\(32, 32, 3\).*x\[None\]"),
    ((2, 3, 32, 32), r"looks like NCHW.*transpose"),
    ((2, 32, 32, 1), r"expects 3 input channels.*in_channels=1"),
    ((2, 2, 2, 3), r"too small.*at least 4x4"),
])
def test_bad_input_shapes_raise_clear_errors(shape, match):
  model = models.densenet_bc_100()
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))


def test_imagenet_minimum_input_size():
  model = models.densenet121()
  assert model.min_input_size() == 29
  jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 29, 29, 3))))
  with pytest.raises(ValueError, match="28x28 is too small.*at least 29x29"):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3))))


@pytest.mark.parametrize("build,match", [
    (lambda: models.densenet_cifar(101, 12), r"L=101 does not fit the \(L-4\)/6 rule"),
    (lambda: models.densenet_cifar(41, 12, bottleneck=False), r"\(L-4\)/3 rule"),
    (lambda: models.densenet_bc_100(growth_rate=0), "growth_rate must be a positive int"),
    (lambda: models.densenet_bc_100(compression=0.0), r"compression \(theta\) must lie in"),
    (lambda: models.densenet_bc_100(compression=1.5), r"compression \(theta\) must lie in"),
    (lambda: models.densenet_bc_100(drop_rate=1.0), "drop_rate"),
    (lambda: models.densenet_bc_100(block_config=()), "block_config"),
    (lambda: models.densenet_bc_100(stem="resnet"), "stem must be one of"),
    (lambda: models.densenet_bc_100(bn_size=0), "bn_size"),
])
def test_bad_configs_raise_clear_errors(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.slow
def test_forward_mode_autodiff_agrees_with_reverse_mode():
  model = tiny(depth=10)
  x = images((4, 8, 8, 3))
  v = init(model, x)
  labels = jnp.arange(4) % 5
  loss = lambda p: summary.train_loss(model, p, v["batch_stats"], x, labels)[0]
  direction = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.01), v["params"])
  _, tangent = jax.jit(lambda p, t: jax.jvp(loss, (p,), (t,)))(v["params"], direction)
  grads = jax.jit(jax.grad(loss))(v["params"])
  dot = sum(jnp.vdot(g, t) for g, t in zip(jax.tree_util.tree_leaves(grads),
                                           jax.tree_util.tree_leaves(direction)))
  np.testing.assert_allclose(tangent, dot, rtol=1e-4)
  assert abs(float(dot)) > 1e-6


# ------------------------------------------------------------- swappable modules, loss


def _reduced_elements(jaxpr):
  """Elements summed by every reduce_sum of a jaxpr, nested jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "reduce_sum":
      total += eqn.invars[0].aval.size
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += _reduced_elements(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += _reduced_elements(sub)
  return total


def test_default_batch_norm_reduces_each_map_once_per_block():
  x = jnp.zeros((2, 8, 8, 3))

  def reduced(model):
    v = models.abstract_variables(model, x.shape)
    return _reduced_elements(jax.make_jaxpr(
        lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(v).jaxpr)

  shared, plain = reduced(tiny(depth=40)), reduced(tiny(depth=40, norm=nn.BatchNorm))
  # Per block of L=6 layers (k=4) a layer's norm1 reads m0 + (l-1)k channels: re-reducing them
  # all costs sum_l (m0 + (l-1)k) channels, sharing each map's moments m0 + Lk.
  assert shared < 0.75 * plain, (shared, plain)


@pytest.mark.slow
def test_group_norm_replaces_batch_norm_everywhere():
  model = tiny(depth=10, norm=functools.partial(nn.GroupNorm, num_groups=1))
  x = images((4, 8, 8, 3))
  v = init(model, x)
  assert "batch_stats" not in v
  assert set(v["params"]["denseblock1"]["denselayer1"]["norm1"]) == {"scale", "bias"}
  labels = jnp.arange(4) % 5

  def grads(m):
    def loss(params):
      logits = m.apply({"params": params}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return jax.jit(jax.grad(loss))(v["params"])

  g = grads(model)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(g))
  chex.assert_trees_all_close(grads(model.clone(memory_efficient=True)), g, rtol=1e-5,
                              atol=1e-7)
  # GroupNorm normalises each example on its own: example 0 ignores the rest of the batch.
  np.testing.assert_allclose(apply(model, v, x)[:1], apply(model, v, x[:1]), rtol=1e-5,
                             atol=1e-5)


def test_act_is_used_after_every_norm():
  x = images()
  v = init(tiny(), x)
  relu, gelu = apply(tiny(features_only=True), v, x), apply(
      tiny(features_only=True, act=nn.gelu), v, x)
  np.testing.assert_array_equal(relu["stem"], gelu["stem"])  # the CIFAR stem is a bare conv
  assert not np.allclose(relu["block1"], gelu["block1"], atol=1e-3)


@pytest.mark.parametrize("kernel,strides", [((1, 1), (1, 1)), ((3, 3), (1, 1)), ((1, 1), (2, 2))])
def test_conv_as_matmul_equals_convolution(kernel, strides):
  x = images((2, 8, 8, 6))
  as_dot = models.Conv(5, kernel, strides, matmul_1x1=True)
  as_conv = models.Conv(5, kernel, strides, matmul_1x1=False)
  v = as_conv.init(jax.random.key(0), x)
  assert jax.tree_util.tree_map(jnp.shape, v) == {"params": {"kernel": (*kernel, 6, 5)}}
  np.testing.assert_allclose(as_dot.apply(v, x), as_conv.apply(v, x), rtol=1e-5, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(as_dot.apply)(v, x))
  assert ("dot_general" in jaxpr) == (kernel == (1, 1) and strides == (1, 1))
  assert backends.fast_path("cpu").matmul_1x1 and not backends.fast_path("cuda").matmul_1x1


def test_init_is_one_program_that_ignores_the_partitionable_threefry_setting():
  model = models.densenet_bc(depth=16, growth_rate=4, num_classes=3)
  x = jnp.zeros((2, 16, 16, 3))
  key = jax.random.key(0)
  texts = {}
  for partitionable in (True, False):
    with jax.threefry_partitionable(partitionable):
      texts[partitionable] = jax.jit(lambda k: model.init(k, x, train=False)).lower(key).as_text()
      # same variables as flax's own (eager) init under either setting
      chex.assert_trees_all_close(model.init(key, x, train=False),
                                  nn.Module.init(model, key, x, train=False))
  # XLA:CPU compiles the partitionable threefry ~10x slower: the initialisers never use it.
  assert texts[True] == texts[False]


def test_batchnorm_options_the_shared_moments_do_not_cover_fall_back_to_flax():
  # Exact variance (use_fast_variance=False) on inputs with a large mean: the shared moments'
  # E[x^2] - E[x]^2 would differ in float32; the library's BatchNorm must give flax's numbers.
  x = 100.0 + jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  y = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
  features = models.DenseFeatures.start(x, models.BatchNorm, train=True).append(y)
  ours = models.BatchNorm(use_running_average=False, use_fast_variance=False)
  flax_bn = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
  v = flax_bn.init(jax.random.key(2), features.concat())
  out, _ = ours.apply(v, features, mutable=["batch_stats"])
  expected, _ = flax_bn.apply(v, features.concat(), mutable=["batch_stats"])
  np.testing.assert_array_equal(out, expected)
