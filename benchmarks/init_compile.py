"""Time of `model.init` (which compiles itself) and of `jax.jit(model.init)`, against the
compile time of the same model's train-mode value_and_grad.

    python benchmarks/init_compile.py --model densenet_bc_100 --batch 8

All three run in this process, one after the other, under JAX's default threefry setting;
prints one JSON row with the times, their ratios and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from densenet_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv: list[str] | None = None) -> dict:
  """Compiles both programs and prints their compile seconds."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet_bc_100")
  p.add_argument("--batch", type=int, default=8)
  args = p.parse_args(argv)
  model = models.get_model(args.model)
  x = jnp.zeros(models.native_input_shape(model, args.batch))
  load = os.getloadavg()[0]
  start = time.perf_counter()
  jax.block_until_ready(model.init(jax.random.key(0), x, train=False))  # one jitted program
  init_s = time.perf_counter() - start
  start = time.perf_counter()
  jax.jit(lambda k: model.init(k, x, train=False)).lower(jax.random.key(0)).compile()
  jit_init_s = time.perf_counter() - start  # inside a user's jit
  variables = models.abstract_variables(model, x.shape)

  def loss(params, batch_stats):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.zeros(x.shape[0], jnp.int32)).mean()

  start = time.perf_counter()
  jax.jit(jax.value_and_grad(loss)).lower(variables["params"],
                                           variables["batch_stats"]).compile()
  grad_s = time.perf_counter() - start
  row = {"bench": "init_compile", "model": args.model, "batch": args.batch,
         "init_s": round(init_s, 2), "jit_init_compile_s": round(jit_init_s, 2),
         "grad_compile_s": round(grad_s, 2), "ratio": round(init_s / grad_s, 3),
         "jit_ratio": round(jit_init_s / grad_s, 3), "load_before": round(load, 2),
         "load_after": round(os.getloadavg()[0], 2),
         "threefry_partitionable": jax.config.jax_threefry_partitionable}
  print(json.dumps(row), flush=True)
  return row


if __name__ == "__main__":
  main()
