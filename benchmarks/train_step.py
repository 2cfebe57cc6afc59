"""Throughput of the project's training step, needing only jax, flax, optax (no TF, no configs).

Builds the step the trainer runs -- `train.step.create_optimizer` (SGD, Nesterov 0.9, weight
decay 1e-4), `create_train_state` and `make_train_step` (shard_map over a 1-D data mesh of
every device, donated state) -- on a synthetic batch, compiles it, and reports the median of --steps timed steps
after --warmup untimed ones, each waited for with block_until_ready:

    python benchmarks/train_step.py --model densenet_bc_100 --batch 64
    python benchmarks/train_step.py --model densenet121 --batch 256 --dtype bfloat16

XLA flags go in the XLA_FLAGS environment variable. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

# The fields of configs/default.py that create_optimizer and make_train_step read.
STEP_CONFIG = types.SimpleNamespace(weight_decay=1e-4, momentum=0.9, nesterov=True,
                                    label_smoothing=0.0, seed=0)


def build(model_name: str, batch: int, dtype: str = "float32", memory_efficient: bool = False,
          image_size: int | None = None, **overrides: Any) -> types.SimpleNamespace:
  """The trainer's step for a preset on a synthetic batch: model, shape, state, data, step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from densenet_jax import models  # pylint: disable=g-import-not-at-top
  from train import step as train  # pylint: disable=g-import-not-at-top

  if jax.default_backend() == "cpu":
    _common.fast_cpu_init()
  model = models.get_model(model_name, dtype=jnp.dtype(dtype), memory_efficient=memory_efficient,
                           **overrides)
  size = image_size or models.native_input_shape(model)[1]
  shape = (batch, size, size, model.in_channels)
  tx = train.create_optimizer(STEP_CONFIG, 0.1)
  mesh = train.make_mesh()
  state = jax.jit(lambda rng: train.create_train_state(model, tx, shape, rng),
                  out_shardings=NamedSharding(mesh, P()))(jax.random.key(0))
  rng = np.random.default_rng(0)
  data = jax.device_put({"image": rng.standard_normal(shape, np.float32),
                         "label": rng.integers(0, model.num_classes, (batch,), np.int32)},
                        NamedSharding(mesh, P(train.AXIS)))
  return types.SimpleNamespace(model=model, shape=shape, state=state, data=data,
                               step=train.make_train_step(model, tx, STEP_CONFIG, mesh))


def measure(model_name: str, batch: int, dtype: str = "float32", memory_efficient: bool = False,
            steps: int = 10, warmup: int = 2, image_size: int | None = None,
            **overrides: Any) -> dict[str, Any]:
  """Compiles and times one training step of a preset (`overrides` replace its attributes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from densenet_jax import summary  # pylint: disable=g-import-not-at-top

  b = build(model_name, batch, dtype, memory_efficient, image_size, **overrides)
  model, shape, state, data, step = b.model, b.shape, b.state, b.data, b.step
  size = shape[1]
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = jax.block_until_ready(compiled(state, data))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  load_after = _common.loadavg()
  # Training FLOPs ~ 6 x forward MACs per image: forward 2 x MACs, backward twice the forward.
  gflop = 6 * summary.forward_macs(model.clone(dtype=jnp.float32), (1, *shape[1:])) / 1e9
  row = {"bench": "train_step", "model": model_name, "batch": batch, "image": size,
         "dtype": dtype, "memory_efficient": memory_efficient,
         "block_buffer": overrides.get("block_buffer", "auto"), "backend": jax.default_backend(),
         "devices": jax.device_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "compile_s": round(compile_s, 2), "steps": steps, **_common.timing(times, batch),
         "gflop_per_img": round(gflop, 3),
         "temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2**20, 1),
         "loss": round(float(metrics["loss"]), 4),
         "load_before": load_before, "load_after": load_after}
  row["gflops"] = round(row["img_per_s"] * gflop, 1)
  return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Measures one configuration and prints its JSON row."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet_bc_100", help="a densenet_jax preset name")
  p.add_argument("--batch", type=int, default=64, help="global batch size")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--memory-efficient", action="store_true")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--image-size", type=int, default=None, help="default: the preset's")
  p.add_argument("--block-config", default=None, help="e.g. 1,1,1 (tiny smoke-test nets)")
  p.add_argument("--block-buffer", choices=("auto", "on", "off"), default="auto",
                 help="each dense block as one buffer (densenet_jax.buffer); auto: the backend's")
  args = p.parse_args(argv)
  overrides = {}
  if args.block_buffer != "auto":
    overrides["block_buffer"] = args.block_buffer == "on"
  if args.block_config:
    overrides["block_config"] = tuple(int(n) for n in args.block_config.split(","))
  row = measure(args.model, args.batch, args.dtype, args.memory_efficient, args.steps,
                args.warmup, args.image_size, **overrides)
  _common.emit(row)
  return row


if __name__ == "__main__":
  main()
