"""The pod planner: ahead-of-time TPU compiles of the trainer's own steps (needs libtpu only)."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import digits_bc
from densenet_jax import models
from train import errors, plan
from train import step as step_lib

libtpu = pytest.importorskip("libtpu", reason="the planner compiles with libtpu: pip install -e '.[tpu]'")


def tiny_config(**fields):
  """A DenseNet-BC of one layer per block on 8x8 digits: compiles in seconds."""
  c = digits_bc.get_config()
  c.model_overrides = {"depth": 10}
  for k, v in fields.items():
    setattr(c, k, v)
  return c


def test_plan_equals_an_independent_compile_of_the_same_step():
  config = tiny_config()
  p = plan.plan(config, "v5e:2x2", max_batch=False)
  # The same step built by hand: the preset, SGD + Nesterov + decay, a mesh over the topology.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model = models.densenet_bc(depth=10, num_classes=10, in_channels=1, drop_rate=0.0,
                             matmul_1x1=False, layer_barrier=False)
  tx = optax.chain(optax.add_decayed_weights(1e-4),
                   optax.sgd(optax.piecewise_constant_schedule(0.1, {110: 0.1, 165: 0.1}), 0.9,
                             nesterov=True))  # 220 steps: x0.1 at 50% and 75%
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  state = step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              opt_state=jax.eval_shape(tx.init, variables["params"]))
  state = jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())), state)
  shard = NamedSharding(mesh, P("data"))
  batch = {"image": jax.ShapeDtypeStruct((64, 8, 8, 1), jnp.float32, sharding=shard),
           "label": jax.ShapeDtypeStruct((64,), jnp.int32, sharding=shard)}
  compiled = step_lib.make_train_step(model, tx, config, mesh).lower(state, batch).compile()
  memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
  assert p["per_chip_batch"] == 16 and p["chips"] == 4 and p["fits"]
  assert p["per_chip_temp_bytes"] == memory.temp_size_in_bytes
  assert p["per_chip_argument_bytes"] == memory.argument_size_in_bytes
  assert p["flops_per_step"] == cost["flops"]
  assert p["bytes_accessed_per_step"] == cost["bytes accessed"]
  # The roofline is the slower of compute at the bf16 peak and traffic at full bandwidth.
  chip = plan.CHIPS["v5e"]
  assert p["roofline_step_seconds"] == pytest.approx(
      max(cost["flops"] / chip.bf16_flops_per_s, cost["bytes accessed"] / chip.hbm_bytes_per_s))
  assert p["roofline_images_per_s"] == pytest.approx(16 / p["roofline_step_seconds"])
  assert p["steps_per_epoch"] == 1437 // 64 and p["total_steps"] == 10 * (1437 // 64)


@pytest.mark.slow
def test_oversized_batch_does_not_fit_and_the_largest_fitting_batch_is_bracketed():
  # 16x16 images hold ~4x the ~70 KB of an 8x8 one: 250k per chip is far past v5e's 16 GiB
  # (ImageNet's 1.28M examples make room for the batch).
  per_chip = 250_000
  big = dict(dataset="imagenet2012", eval_split="validation", image_size=16)
  p = plan.plan(tiny_config(batch_size=4 * per_chip, **big), "v5e:2x2", max_batch_compiles=4)
  assert p["fits"] is False and "per_chip_peak_bytes" not in p
  best, over = p["max_per_chip_batch"], p["max_batch_not_fitting"]
  assert 0 < best < per_chip and best % 8 == 0
  assert over is not None and best < over <= per_chip
  assert len(p["max_batch_compiles"]) <= 4
  # The reported batch really fits: the planner at that batch says so.
  fitting = plan.plan(tiny_config(batch_size=4 * best, **big), "v5e:2x2", max_batch=False)
  assert fitting["fits"] and fitting["per_chip_peak_bytes"] <= fitting["hbm_bytes"]


def test_batch_that_does_not_divide_over_the_chips_is_the_trainers_error():
  with pytest.raises(errors.ConfigError, match=r"batch_size=66 does not divide over 4 devices"):
    plan.plan(tiny_config(batch_size=66), "v5e:2x2", max_batch=False)


def test_unknown_topology_is_a_config_error():
  with pytest.raises(errors.ConfigError, match="GENERATION:SHAPE"):
    plan.tpu_devices("v9z:2x2")
  with pytest.raises(errors.ConfigError, match="does not know this topology"):
    plan.tpu_devices("v5e:3x7")


def test_command_line_prints_a_report_and_json_last(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "train.plan", "--config", "configs/digits_bc.py",
       "--topology", "v6e:2x2", "--config.model_overrides.depth=10", "--json", "--nomax_batch"],
      capture_output=True, text=True, timeout=600, check=True)
  *lines, last = out.stdout.strip().splitlines()
  result = json.loads(last)
  for field in ("per_chip_peak_bytes", "per_chip_temp_bytes", "per_chip_argument_bytes",
                "hbm_bytes", "fits", "flops_per_step", "bytes_accessed_per_step",
                "roofline_images_per_s", "compile_seconds"):
    assert field in result, field
  assert result["chip"] == "TPU v6e (Trillium)" and result["hbm_bytes"] == 32 << 30
  assert any("not hardware measurements" in line for line in lines)
  assert out.stderr.strip() == ""  # libtpu's start-up warnings are kept off the console
  bad = subprocess.run([sys.executable, "-m", "train.plan", "--config", "configs/digits_bc.py",
                        "--topology", "v5e:3x7"], capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
  assert bad.stderr.startswith("error: --topology=v5e:3x7")


def test_split_sizes_follow_tfds_split_expressions():
  assert plan.split_size("svhn_cropped", "train+extra") == 73_257 + 531_131
  assert plan.split_size("cifar10", "train[:90%]") == 45_000
  assert plan.split_size("cifar10", "train[-640:]") == 640
  with pytest.raises(errors.ConfigError, match="cannot size"):
    plan.split_size("cifar10", "validation")


@pytest.mark.parametrize("base,limit", [(10 << 20, 301), (4 << 30, 157)])
def test_max_batch_search_brackets_a_linear_memory_model_in_few_compiles(base, limit):
  # memory = base + 50 MB per image (DenseNet-121 in bf16 holds ~60 MB), with the limit
  # between two batches; failures state the need in 0.01 GiB, as the TPU compiler does.
  memory = lambda b: base + 50_000_000 * b
  hbm = memory(limit) + 1000

  def fits_at(b):
    if memory(b) > hbm:
      raise plan.OutOfMemory(f"required for HLO temporaries ({memory(b) / plan.GiB:.2f}G)")
    return memory(b)

  best, over, compiled = plan.largest_fitting_batch(fits_at, 16, memory(16), True, hbm)
  assert (best, over) == (limit, limit + 1)
  assert len(compiled) <= 3, compiled  # undershoot, extrapolate, confirm
