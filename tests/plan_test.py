"""The pod planner: ahead-of-time TPU compiles of the trainer's own steps (needs libtpu only)."""

import dataclasses
import json
import subprocess
import sys

import chex
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
  # two layers per block: each block's layers run as one loop body on TPU (densenet_jax.buffer)
  config = tiny_config(model_overrides={"depth": 16})
  p = plan.plan(config, "v5e:2x2", max_batch=False)
  # The same step built by hand: the preset, SGD + Nesterov + decay, a mesh over the topology.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.asarray(devices), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  model = models.densenet_bc(depth=16, num_classes=10, in_channels=1, drop_rate=0.0,
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
  compiled, unrolled = (
      step_lib.make_train_step(m, tx, config, mesh).lower(state, batch).compile()
      for m in (model, model.clone(unroll_layers=True)))
  memory, looped = compiled.memory_analysis(), compiled.cost_analysis()
  # XLA's cost analysis counts a loop body once: the work is the loop-free step's, the memory
  # the step's own
  assert " while(" in compiled.as_text() and " while(" not in unrolled.as_text()
  cost = unrolled.cost_analysis()
  assert looped["flops"] < cost["flops"]
  assert p.per_chip_batch == 16 and p.chips == 4 and p.fits
  assert p.per_chip_temp_bytes == memory.temp_size_in_bytes
  assert p.per_chip_argument_bytes == memory.argument_size_in_bytes
  assert p.flops_per_step == cost["flops"]
  assert p.bytes_accessed_per_step == cost["bytes accessed"]
  assert p.mxu_flops_per_step == plan.matmul_flops(unrolled.as_text(), 128).mxu_flops
  assert p.work_source == "the compiler's cost analysis"
  # The roofline is the slowest of compute at the bf16 peak, the MXU-padded convolutions and
  # dots at the same peak, and traffic at full bandwidth.
  chip = plan.CHIPS["v5e"]
  bounds = (cost["flops"] / chip.bf16_flops_per_s, p.mxu_flops_per_step / chip.bf16_flops_per_s,
            cost["bytes accessed"] / chip.hbm_bytes_per_s)
  chex.assert_trees_all_close(
      (p.compute_bound_seconds, p.mxu_bound_seconds, p.memory_bound_seconds), bounds)
  assert p.roofline_step_seconds == pytest.approx(max(bounds))
  assert p.bound == plan.BOUNDS[bounds.index(max(bounds))]
  assert p.roofline_images_per_s == pytest.approx(16 / p.roofline_step_seconds)
  assert p.steps_per_epoch == 1437 // 64 and p.total_steps == 10 * (1437 // 64)
  assert p.max_batch_compiles is None  # max_batch=False: no search


def test_oversized_batch_does_not_fit_and_the_largest_fitting_batch_is_bracketed():
  # 16x16 images hold ~4x the ~70 KB of an 8x8 one: 250k per chip is far past v5e's 16 GiB
  # (ImageNet's 1.28M examples make room for the batch).
  per_chip = 250_000
  big = dict(dataset="imagenet2012", eval_split="validation", image_size=16)
  p = plan.plan(tiny_config(batch_size=4 * per_chip, **big), "v5e:2x2", max_batch_compiles=4)
  assert p.fits is False and p.per_chip_peak_bytes is None
  best, over = p.max_per_chip_batch, p.max_batch_not_fitting
  assert 0 < best < per_chip and best % 8 == 0
  assert over is not None and best < over <= per_chip
  assert len(p.max_batch_compiles) <= 4
  # The reported batch really fits: the planner at that batch says so.
  fitting = plan.plan(tiny_config(batch_size=4 * best, **big), "v5e:2x2", max_batch=False)
  assert fitting.fits and fitting.per_chip_peak_bytes <= fitting.hbm_bytes


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
  assert set(result) == {f.name for f in dataclasses.fields(plan.Plan)}
  for field in ("per_chip_peak_bytes", "per_chip_temp_bytes", "per_chip_argument_bytes",
                "flops_per_step", "bytes_accessed_per_step", "mxu_flops_per_step",
                "roofline_images_per_s", "compile_seconds"):
    assert result[field] > 0, field
  assert result["chip"] == "TPU v6e (Trillium)" and result["hbm_bytes"] == 32 << 30
  assert result["chip_mxu_width"] == 256 and result["max_per_chip_batch"] is None
  assert any("not hardware measurements" in line for line in lines)
  bounds = next(line for line in lines if line.strip().startswith("bounds"))
  assert "compute" in bounds and "MXU-width compute" in bounds and "HBM bandwidth" in bounds
  assert any(f"bound by {result['bound']}" in line for line in lines)
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


# Every field the planner's --json printed before the plan became a dataclass: scripts read them.
JSON_FIELDS_BEFORE = (
    "topology num_slices chip chips processes model dataset dtype memory_efficient global_batch "
    "per_chip_batch hbm_bytes steps_per_epoch total_steps eval_per_chip_batch "
    "chip_bf16_flops_per_s chip_hbm_bytes_per_s chip_source estimate fits "
    "per_chip_required_bytes eval_per_chip_required_bytes eval_per_chip_peak_bytes "
    "eval_per_chip_temp_bytes eval_flops_per_step eval_bytes_accessed_per_step "
    "eval_compile_seconds eval_compile_cpu_seconds per_chip_argument_bytes "
    "per_chip_output_bytes per_chip_alias_bytes per_chip_temp_bytes "
    "per_chip_generated_code_bytes per_chip_peak_bytes headroom_bytes flops_per_step "
    "bytes_accessed_per_step flops_per_image bytes_accessed_per_image roofline_step_seconds "
    "bound roofline_images_per_s roofline_images_per_s_global compute_fraction_of_peak "
    "epoch_seconds run_seconds chip_hours compile_seconds compile_cpu_seconds "
    "max_per_chip_batch max_batch_not_fitting max_batch_compiles").split()


def test_a_plan_keeps_every_json_field_it_ever_had():
  fields = {f.name for f in dataclasses.fields(plan.Plan)}
  assert set(JSON_FIELDS_BEFORE) <= fields, set(JSON_FIELDS_BEFORE) - fields
  assert {"compute_bound_seconds", "mxu_bound_seconds", "memory_bound_seconds",
          "mxu_flops_per_step", "chip_mxu_width"} <= fields


@pytest.mark.parametrize("topology,num_slices,message", [
    ("v5e:64x64", 1, r"4,096 chips, more than a TPU v5e pod \(256 chips"),
    ("v5e:2x2x2", 1, r"TPU v5e slices are 2-D"),
    ("v6e:4x4x4", 1, r"TPU v6e \(Trillium\) slices are 2-D"),
    ("v4:2x2", 1, r"TPU v4 slices are 3-D"),
    ("v5p:32x32x32", 1, r"32,768 chips, more than a TPU v5p pod \(8,960 chips"),
    ("v5e:2x2", 0, r"--num_slices=0: must be between 1 and"),
    ("v5e:16x16", 1000, r"--num_slices=1000: must be between 1 and 256"),
])
def test_slices_no_pod_has_are_one_line_errors(topology, num_slices, message):
  with pytest.raises(errors.ConfigError, match=message) as e:
    plan.tpu_devices(topology, num_slices)
  assert "\n" not in str(e.value)


def test_zero_dimensions_never_reach_libtpu():
  # libtpu divides by a zero dimension (SIGFPE, exit 136, nothing printed): each must be a
  # ConfigError raised before it is called. A subprocess, so that a regression is a failure here
  # and not the end of the test run.
  probe = ("from train import errors, plan\n"
           "for t in ('v5e:0x2', 'v5e:2x0', 'v4:0x0x0', 'v6e:0x4', 'v5e:-2x2', 'v5e:2x'):\n"
           "  try:\n"
           "    plan.tpu_devices(t)\n"
           "  except errors.ConfigError as e:\n"
           "    print(e)\n")
  out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, (out.returncode, out.stderr[-500:])
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 6 and all("must be a positive integer" in line for line in lines), lines
  cli = subprocess.run([sys.executable, "-m", "train.plan", "--config", "configs/digits_bc.py",
                        "--topology", "v5e:0x2"], capture_output=True, text=True, timeout=300)
  assert cli.returncode == 1 and cli.stdout == "", (cli.returncode, cli.stdout)
  assert cli.stderr.strip() == ("error: --topology=v5e:0x2: every dimension must be a positive "
                                "integer, e.g. v5e:2x2.")


def _fake_compiles(monkeypatch, over: int):
  """compile_cost as a stand-in: a step over `over` images (global) does not fit; records calls."""
  calls = []
  matmul = plan.MatmulFlops(flops=1e9, mxu_flops=2e9, instructions=1)

  def compile_cost(lowerable, state, batch, **_):
    del lowerable, state
    images = batch["image"].shape[0]
    calls.append(images)
    if images > over:
      raise plan.OutOfMemory(f"required for HLO temporaries ({images / 1000:.2f}G)")
    return plan.StepCost(argument_bytes=1 << 20, output_bytes=1 << 20, alias_bytes=1 << 20,
                         temp_bytes=images * 1000, generated_code_bytes=0,
                         peak_bytes=(1 << 20) + images * 1000, flops=1e9, bytes_accessed=1e8,
                         matmul=matmul, compile_seconds=1.0, compile_cpu_seconds=1.0)

  monkeypatch.setattr(plan.planner, "compile_cost", compile_cost)
  return calls


BIG = dict(dataset="imagenet2012", eval_split="validation", batch_size=4096, eval_batch_size=64)


def test_nomax_batch_compiles_only_the_configured_steps(monkeypatch):
  calls = _fake_compiles(monkeypatch, over=1000)
  p = plan.plan(tiny_config(**BIG), "v5e:2x2", max_batch=False)
  assert calls == [4096, 64]  # the train step (does not fit) and the eval step: no search
  assert p.fits is False and p.per_chip_required_bytes == pytest.approx(4.10 * plan.GiB)
  assert p.max_per_chip_batch is None and p.max_batch_compiles is None
  assert "DOES NOT FIT" in plan.report(p) and "max batch" not in plan.report(p)
  json.dumps(p.asdict())  # --json


def test_max_batch_search_reports_each_compile_and_stops_at_its_bound(monkeypatch):
  calls = _fake_compiles(monkeypatch, over=1500)  # 375 images per chip
  heard = []
  p = plan.plan(tiny_config(**BIG), "v5e:2x2", max_batch_compiles=2, progress=heard.append)
  assert len(p.max_batch_compiles) == 2 and calls[2:] == [4 * b for b in p.max_batch_compiles]
  assert sum("compile" in line and "of at most 2" in line for line in heard) == 2
  outcomes = [line.strip() for line in heard if line.startswith("    ")]
  assert outcomes == ["does not fit (needs 2.05 GiB)", "fits (2.0 MiB)"], heard
  assert p.max_per_chip_batch is not None and "max batch" in plan.report(p)


def test_a_tpu7x_chip_is_its_two_devices(monkeypatch):
  # libtpu gives each TPU7x TensorCore its own device: 8 devices for the 4 chips of 2x2x1.
  calls = _fake_compiles(monkeypatch, over=10**9)
  p = plan.plan(tiny_config(**BIG), "tpu7x:2x2x1", max_batch=False)
  assert calls == [4096, 64] and p.chips == 4 and p.per_chip_batch == 1024
  one_device_peak = (1 << 20) + 4096 * 1000  # the stand-in's figures are per device
  assert p.per_chip_peak_bytes == 2 * one_device_peak and p.flops_per_step == 2e9
  assert p.mxu_flops_per_step == 4e9 and p.roofline_images_per_s_global == pytest.approx(
      4 * p.roofline_images_per_s)


def _compiled_text(f, *shapes, topology="v5e:1x1"):
  """The optimised HLO of `f` compiled for one chip of `topology`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = plan.CHIPS[topology.split(":")[0]]
  devices = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                         chip_config_name=chip.chip_config).devices
  sharding = NamedSharding(Mesh(np.asarray(devices), ("data",)), P())
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sharding) for s in shapes]
  return jax.jit(f).lower(*args).compile().as_text()


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# 8 images of 16x16x20 -> 12 channels: 2048 output rows, contraction 3*3*20 = 180. On a
# 128-wide MXU the contraction takes two widths (256) and the 12 channels one (128); on a
# 256-wide one, one width each.
@pytest.mark.parametrize("topology,width,contraction,features",
                         [("v5e:1x1", 128, 256, 128), ("v6e:1x1", 256, 256, 256)])
def test_mxu_flops_of_a_3x3_convolution_making_12_channels(topology, width, contraction,
                                                           features):
  text = _compiled_text(_conv, (8, 16, 16, 20), (3, 3, 20, 12), topology=topology)
  counted = plan.matmul_flops(text, width)
  assert counted.instructions == 1
  assert counted.flops == 2 * 2048 * 180 * 12
  assert counted.mxu_flops == 2 * 2048 * contraction * features


def test_mxu_flops_of_a_convolutions_gradient_and_a_dense_layer():
  loss = lambda x, w: jnp.sum(_conv(x, w).astype(jnp.float32) ** 2)
  text = _compiled_text(jax.grad(loss, argnums=(0, 1)), (8, 16, 16, 20), (3, 3, 20, 12))
  counted = plan.matmul_flops(text, 128)
  # forward: 2048 rows, K = 180 -> 256, 12 -> 128 features;
  # input gradient: 2048 rows, K = 3*3*12 = 108 -> 128, 20 -> 128 features;
  # weight gradient: 3*3*20 = 180 rows, K = 8 images * 16*16 positions = 2048, 12 -> 128.
  assert counted.instructions == 3
  assert counted.flops == 2 * (2048 * 180 * 12 + 2048 * 108 * 20 + 180 * 2048 * 12)
  assert counted.mxu_flops == 2 * (2048 * 256 * 128 + 2048 * 128 * 128 + 180 * 2048 * 128)
  dense = plan.matmul_flops(_compiled_text(jnp.matmul, (64, 100), (100, 10)), 128)
  assert (dense.flops, dense.mxu_flops) == (2 * 64 * 100 * 10, 2 * 64 * 128 * 128)


def test_mxu_flops_of_a_batched_dot_written_as_hlo():
  text = "\n".join([
      "  %a = bf16[4,64,100]{2,1,0} parameter(0)",
      "  %b = bf16[4,100,10]{2,1,0} parameter(1)",
      "  ROOT %d = f32[4,64,10]{2,1,0} dot(%a, %b), lhs_batch_dims={0}, "
      "lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}",
  ])
  counted = plan.matmul_flops(text, 128)
  assert (counted.flops, counted.mxu_flops) == (2 * 4 * 64 * 100 * 10, 2 * 4 * 64 * 128 * 128)


def test_mxu_widths_follow_jax_s_own_chip_table():
  from jax._src import tpu_info  # pylint: disable=g-import-not-at-top
  versions = {"v4": "TPU_V4", "v5e": "TPU_V5E", "v5p": "TPU_V5P", "v6e": "TPU_V6E",
              "tpu7x": "TPU_7X"}
  for generation, version in versions.items():
    info = tpu_info._get_tpu_info_impl(tpu_info.ChipVersion[version], 1)  # pylint: disable=protected-access
    assert plan.CHIPS[generation].mxu_width == info.mxu_column_size, generation


@pytest.mark.parametrize("module", ["train.plan", "train.main"])
def test_a_missing_config_is_one_line(module):
  out = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip() == "error: --config is required, e.g. --config configs/cifar_bc.py."


@pytest.mark.parametrize("topology,num_slices", [
    ("h100:0", 1), ("h100:9", 1), ("h100:2x8x1", 1), ("h100:8", 2), ("a100:0x8", 1)])
def test_gpu_topologies_are_hosts_of_at_most_eight(topology, num_slices):
  with pytest.raises(errors.ConfigError, match=f"--topology={topology}") as e:
    plan.accelerator_devices(topology, num_slices)
  assert "\n" not in str(e.value)
  assert plan.check_topology("h200:2x8").name == "NVIDIA H200 SXM"


def test_gpu_library_calls_count_as_the_convolutions_and_dots_they_are():
  # XLA:GPU's HLO: cuDNN's three convolutions of one 3x3 layer (48 -> 12 channels on 8 images
  # of 8x8; dim_labels describe the forward convolution) and a cuBLAS gemm.
  text = "\n".join([
      "ENTRY %main (x: f32[8,8,8,48], w: f32[12,3,3,48], dy: f32[8,8,8,12]) -> f32[] {",
      "  %x = f32[8,8,8,48]{3,2,1,0} parameter(0)",
      "  %w = f32[12,3,3,48]{3,2,1,0} parameter(1)",
      "  %dy = f32[8,8,8,12]{3,2,1,0} parameter(2)",
      "  %a = bf16[64,100]{1,0} parameter(3)",
      "  %b = bf16[100,10]{1,0} parameter(4)",
      '  %f = (f32[8,8,8,12]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 '
      'pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward"',
      '  %i = (f32[8,8,8,48]{3,2,1,0}, u8[0]{0}) custom-call(%dy, %w), window={size=3x3 '
      'pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput"',
      '  %k = (f32[12,3,3,48]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=3x3 '
      'pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter"',
      '  %g = (bf16[64,10]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target='
      '"__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":'
      '{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],'
      '"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}',
      "  %o = f32[8,8,8,12]{3,2,1,0} get-tuple-element(%f), index=0",
      "  ROOT %t = (f32[8,8,8,12]{3,2,1,0}) tuple(%o)",
      "}"])
  counted = plan.matmul_flops(text)
  conv = 2 * (8 * 8 * 8) * (3 * 3 * 48) * 12
  assert counted.instructions == 4
  assert counted.flops == counted.mxu_flops == 3 * conv + 2 * 64 * 100 * 10
  x, w, dy = 8 * 8 * 8 * 48 * 4, 12 * 3 * 3 * 48 * 4, 8 * 8 * 8 * 12 * 4
  a, b, g = 64 * 100 * 2, 100 * 10 * 2, 64 * 10 * 2 + 1024
  # each call reads its operands and writes its results; parameters, tuples and their
  # elements move nothing
  assert plan.hlo_bytes_accessed(text) == (x + w + dy) + (dy + w + x) + (x + dy + w) + (a + b + g)


def _gpu_plugin():
  """Skips unless JAX's CUDA plugin can compile for a GPU here."""
  try:
    return plan.gpu_target_config("NVIDIA H100 80GB HBM3")
  except errors.ConfigError as e:
    pytest.skip(str(e))


@pytest.mark.slow
def test_gpu_plan_equals_an_independent_deviceless_compile():
  target = _gpu_plugin()
  config = tiny_config()
  p = plan.plan(config, "h100:8", max_batch=False)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(platform="cuda", target_config=target,
                                         topology="1x1x8").devices
  mesh = step_lib.make_mesh(list(devices))
  model = step_lib.create_model(config, 10, 1, platform="cuda")
  tx = step_lib.create_optimizer(config, step_lib.learning_rate_fn(config, 22, 220))
  state = step_lib.abstract_train_state(model, tx, (1, 8, 8, 1), mesh, config.seed)
  compiled = step_lib.make_train_step(model, tx, config, mesh).lower(
      state, step_lib.abstract_batch(mesh, 64, (8, 8, 1))).compile()
  memory = compiled.memory_analysis()
  assert p.chip == "NVIDIA H100 SXM" and p.chips == 8 and p.per_chip_batch == 8 and p.fits
  assert p.per_chip_temp_bytes == memory.temp_size_in_bytes
  assert p.per_chip_argument_bytes == memory.argument_size_in_bytes
  text = compiled.as_text()
  assert p.flops_per_step == plan.matmul_flops(text).flops > 0
  assert p.bytes_accessed_per_step == plan.hlo_bytes_accessed(text) > 0
  assert "optimised HLO" in p.work_source and p.mxu_bound_seconds is None
  assert p.bound in ("compute", "HBM bandwidth") and "GPU compile" in plan.report(p)
