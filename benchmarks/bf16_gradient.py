"""How far a bfloat16 train step's gradient lies from the float32 one, per dense-block form.

The one-buffer block (`block_buffer=True`) sums each map's gradient in the buffer's dtype, layer
by layer, where autodiff of the concatenating block sums it in one fusion; this measures what
that does to the gradient in bfloat16. Same weights and batch for every row; the reference is
the float64 gradient (of the concatenating block; the two forms agree there to ~1e-14), since
with a small batch the float32 gradients are themselves far from it (a DenseNet-121 of 4 images
of 64x64 normalises 16 values per channel in its last block) and two float32 programs that round
in different orders differ by more than rounding. Prints one JSON row per block form:

    python benchmarks/bf16_gradient.py --model densenet121 --batch 4 --size 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from densenet_jax import models, summary  # pylint: disable=wrong-import-position


def gradient(model: models.DenseNet, variables, x, labels):
  """d(train loss)/d(params) in float32, whatever the compute dtype."""
  grads = jax.jit(jax.grad(lambda p: summary.train_loss(
      model, p, variables["batch_stats"], x, labels)[0]))(variables["params"])
  return jax.tree_util.tree_map(lambda g: np.asarray(g, np.float64), grads)


def relative_l2(a, b) -> float:
  """||a - b|| / ||b|| over every leaf of two gradient trees."""
  diff = sum(float(np.sum((x - y) ** 2)) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                           jax.tree_util.tree_leaves(b)))
  norm = sum(float(np.sum(y ** 2)) for y in jax.tree_util.tree_leaves(b))
  return (diff / norm) ** 0.5


def main(argv: list[str] | None = None) -> list[dict]:
  """Prints one JSON row per block form."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="densenet121")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--size", type=int, default=64)
  args = p.parse_args(argv)
  base = models.get_model(args.model, matmul_1x1=False, layer_barrier=False)
  shape = (args.batch, args.size, args.size, base.in_channels)
  x = jax.random.normal(jax.random.key(1), shape)
  labels = jnp.arange(args.batch) % max(base.num_classes, 1)
  variables = jax.jit(lambda: base.init(jax.random.key(0), x[:1]))()
  with jax.enable_x64(True):
    wide = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)
    reference = gradient(base.clone(block_buffer=False, dtype=jnp.float64,
                                    param_dtype=jnp.float64), wide(variables), wide(x), labels)
  rows = []
  for block_buffer in (False, True):
    model = base.clone(block_buffer=block_buffer)
    row = dict(bench="bf16_gradient", model=args.model, batch=args.batch, size=args.size,
               block_buffer=block_buffer,
               float32_vs_float64=relative_l2(gradient(model, variables, x, labels),
                                              reference),
               bfloat16_vs_float64=relative_l2(
                   gradient(model.clone(dtype=jnp.bfloat16), variables, x, labels),
                   reference))
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
