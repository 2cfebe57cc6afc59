"""Train-step throughput and compile time of the project's real training step.

Builds the step exactly as `train.train.train_and_evaluate` does -- `create_model`,
`create_optimizer` (SGD, Nesterov 0.9, weight decay 1e-4), `make_mesh`, `TrainState`,
`make_train_step` (shard_map over a 1-D data mesh, donated state) -- on synthetic data, then
times it:

  lower_s     tracing + lowering to StableHLO
  compile_s   XLA compilation
  step        median (and min) wall time of --steps steps after --warmup untimed ones, each
              waited for with block_until_ready; images/s = batch / median step time

    python benchmarks/train_step.py --model densenet_bc_100 --batch 64
    python benchmarks/train_step.py --model densenet121 --batch 8 --dtype bfloat16 --memory-efficient
    python benchmarks/train_step.py --xla-flags=--xla_cpu_use_onednn=true   # try an XLA flag

Prints one JSON line per run; --markdown FILE appends a row to a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ("model", "batch", "image", "dtype", "memory_efficient", "xla_flags", "lower_s",
           "compile_s", "step_ms", "img_per_s", "img_per_s_best", "gflop_per_img",
           "gflops", "roof_frac", "load_before", "load_after")
DEFAULT_ROOF_GFLOPS = 190.0  # 2 cores of this machine, float32 (see benchmarks/roof.py)


def build_config(model: str, batch: int, dtype: str, memory_efficient: bool,
                 overrides: dict[str, Any] | None = None):
  """configs/default.py's config with the benchmark's fields replaced."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model = model
  config.batch_size = batch
  config.half_precision = dtype == "bfloat16"
  config.memory_efficient = memory_efficient
  for k, v in (overrides or {}).items():
    config.model_overrides[k] = v
  return config


def measure(config, steps: int = 10, warmup: int = 2, image_size: int | None = None,
            model=None, num_classes: int | None = None, roof_gflops: float = DEFAULT_ROOF_GFLOPS
            ) -> dict[str, Any]:
  """Compiles and times `make_train_step` for `config`; `model` replaces create_model's."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from densenet_jax import models, summary  # pylint: disable=g-import-not-at-top
  from train import train  # pylint: disable=g-import-not-at-top

  if model is None:
    preset = models.get_model(config.model)
    classes = num_classes or preset.num_classes
    model = train.create_model(config, classes, 3)
  size = image_size or models.native_input_shape(model)[1]
  batch = config.batch_size
  tx = train.create_optimizer(config, optax.constant_schedule(config.learning_rate))
  mesh = train.make_mesh()
  replicated = NamedSharding(mesh, P())
  data = NamedSharding(mesh, P(train.AXIS))

  def init(rng):
    variables = model.init(rng, jnp.zeros((1, size, size, model.in_channels), jnp.float32),
                           train=False)
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                            batch_stats=variables["batch_stats"],
                            opt_state=tx.init(variables["params"]))

  t0 = time.perf_counter()
  with jax.threefry_partitionable(False):  # XLA:CPU compiles it ~10x faster
    state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  rng = np.random.default_rng(0)
  host_batch = {
      "image": rng.standard_normal((batch, size, size, model.in_channels), np.float32),
      "label": rng.integers(0, max(model.num_classes, 1), (batch,), np.int32),
  }
  device_batch = jax.device_put(host_batch, data)

  step_fn = train.make_train_step(model, tx, config, mesh)
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  lowered = step_fn.lower(state, device_batch)
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  try:
    temp_bytes = int(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    temp_bytes = -1

  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  load_after = _common.loadavg()
  loss = float(metrics["loss"].addressable_data(0))

  stats = _common.summarize_times(times)
  macs = summary.forward_macs(model.clone(memory_efficient=False, dtype=jnp.float32),
                              (1, size, size, model.in_channels))
  gflop_per_img = 6 * macs / 1e9  # forward 2*MACs, backward ~2x forward
  img_per_s = batch / stats["median_s"]
  return {
      "bench": "train_step",
      "model": config.model if config.model else type(model).__name__,
      "batch": batch,
      "image": size,
      "dtype": "bfloat16" if config.half_precision else "float32",
      "memory_efficient": bool(model.memory_efficient),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "devices": jax.device_count(),
      "init_s": round(init_s, 2),
      "lower_s": round(lower_s, 2),
      "compile_s": round(compile_s, 2),
      "steps": steps,
      "step_ms": round(1e3 * stats["median_s"], 2),
      "step_ms_min": round(1e3 * stats["min_s"], 2),
      "step_ms_stdev": round(1e3 * stats["stdev_s"], 2),
      "img_per_s": round(img_per_s, 2),
      "img_per_s_best": round(batch / stats["min_s"], 2),
      "gflop_per_img": round(gflop_per_img, 3),
      "gflops": round(img_per_s * gflop_per_img, 1),
      "roof_gflops": roof_gflops,
      "roof_frac": round(img_per_s * gflop_per_img / roof_gflops, 3),
      "temp_mib": round(temp_bytes / 2**20, 1),
      "loss": round(loss, 4),
      "load_before": load_before,
      "load_after": load_after,
  }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line of this script."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet_bc_100", help="a densenet_jax preset name")
  p.add_argument("--batch", type=int, default=64, help="global batch size")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (config.half_precision)")
  p.add_argument("--memory-efficient", action="store_true", help="config.memory_efficient")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--image-size", type=int, default=None, help="default: the preset's native")
  p.add_argument("--num-classes", type=int, default=None, help="default: the preset's")
  p.add_argument("--block-config", default=None,
                 help="override block_config, e.g. 2,2,2 (tiny smoke-test nets)")
  p.add_argument("--growth-rate", type=int, default=None, help="override growth_rate")
  p.add_argument("--xla-flags", default=None,
                 help="appended to XLA_FLAGS before JAX starts (e.g. --xla_cpu_use_onednn=true)")
  p.add_argument("--roof-gflops", type=float, default=DEFAULT_ROOF_GFLOPS,
                 help="machine roof for the roof_frac column")
  p.add_argument("--markdown", default=None, help="append a row to this markdown table")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures one configuration and prints its JSON row."""
  args = parse_args(argv)
  if args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
  overrides: dict[str, Any] = {}
  if args.block_config:
    overrides["block_config"] = tuple(int(n) for n in args.block_config.split(","))
  if args.growth_rate:
    overrides["growth_rate"] = args.growth_rate
    overrides["num_init_features"] = 2 * args.growth_rate
  if args.num_classes is not None:
    overrides["num_classes"] = args.num_classes
  config = build_config(args.model, args.batch, args.dtype, args.memory_efficient, overrides)
  row = measure(config, steps=args.steps, warmup=args.warmup, image_size=args.image_size,
                roof_gflops=args.roof_gflops)
  if overrides:
    row["overrides"] = {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}
  _common.emit(row)
  _common.append_markdown(args.markdown, COLUMNS, row)
  return row


if __name__ == "__main__":
  main()
