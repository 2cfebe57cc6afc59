"""A rejected idea, kept measurable: the 3x3 conv of a dense layer as one matmul + shifted adds.

XLA:CPU feeds every 3x3 weight-gradient convolution through transpose copies (12% of the
BC-100 step, NOTES.md). The alternative computes x @ W for all 9 taps at once (a 1x1 matmul to
9k channels) and sums the 9 shifted k-channel slices, so forward and backward are plain
matmuls. This times forward+backward of both on the BC-100 bottleneck shape.

    python benchmarks/conv3x3_as_matmul.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position


def main() -> None:
  """Prints one JSON row: median ms of both forms and their max relative difference."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--size", type=int, default=32)
  p.add_argument("--in-channels", type=int, default=48, help="bn_size * k")
  p.add_argument("--out-channels", type=int, default=12, help="k")
  p.add_argument("--reps", type=int, default=15)
  args = p.parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  n, s, c, k = args.batch, args.size, args.in_channels, args.out_channels
  x = jax.random.normal(jax.random.key(0), (n, s, s, c))
  w = jax.random.normal(jax.random.key(1), (3, 3, c, k)) * 0.1
  g = jax.random.normal(jax.random.key(2), (n, s, s, k))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(1, 1), (1, 1)],
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def shifted_matmul(x, w):
    z = jax.lax.dot_general(x, w.transpose(2, 0, 1, 3).reshape(c, 9 * k),
                            (((3,), (0,)), ((), ()))).reshape(n, s, s, 3, 3, k)
    z = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0), (0, 0)))
    return sum(z[:, i:i + s, j:j + s, i, j, :] for i in range(3) for j in range(3))

  def fwd_bwd(f):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.vdot(f(x, w), g), argnums=(0, 1)))

  row = {"bench": "conv3x3_as_matmul", "shape": [n, s, s, c, k], "load_before": _common.loadavg()}
  results = {}
  for name, f in (("xla_conv", conv), ("shifted_matmul", shifted_matmul)):
    step = fwd_bwd(f)
    results[name] = jax.block_until_ready(step(x, w))
    times = []
    for _ in range(args.reps):
      t0 = time.perf_counter()
      jax.block_until_ready(step(x, w))
      times.append(time.perf_counter() - t0)
    row[f"{name}_ms"] = round(1e3 * statistics.median(times), 1)
  diffs = [float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a))) for a, b in zip(
      jax.tree_util.tree_leaves(results["xla_conv"]),
      jax.tree_util.tree_leaves(results["shifted_matmul"]))]
  row["max_rel_diff"] = max(diffs)
  row["load_after"] = _common.loadavg()
  _common.emit(row)


if __name__ == "__main__":
  main()
