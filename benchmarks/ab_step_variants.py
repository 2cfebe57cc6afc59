"""Session-6 experiment: the shipped train step against model variants under the same
compiler options, compiled in one process and timed alternately.

    python benchmarks/ab_step_variants.py densenet_bc_100 64 me 10 [variant,...]

Variants: shipped; barrier (an optimisation barrier on every spatial convolution's input, as
in sessions 4 and 5); conv1x1 (1x1 convolutions left as convolutions, for oneDNN, instead of
matmuls).
"""
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (puts the repo root on sys.path)
import flax.linen as nn
import jax
import train_step as ts
from densenet_jax import models


class BarrierConv(models.Conv):
  @nn.compact
  def __call__(self, x):
    if models._pair(self.kernel_size) != (1, 1):
      x = jax.lax.optimization_barrier(x)
    return super().__call__(x)


V = {"shipped": {}, "barrier": {"conv": BarrierConv},
     "conv1x1": {"conv": functools.partial(models.Conv, matmul_1x1=False)}}
model, batch, me, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "me", int(sys.argv[4])
if len(sys.argv) > 5:
  V = {k: V[k] for k in sys.argv[5].split(",")}
comp, st, data = {}, {}, {}
for k, overrides in V.items():
  b = ts.build(model, batch, memory_efficient=me, **overrides)
  t0 = time.perf_counter()
  comp[k] = b.step.lower(b.state, b.data).compile()
  st[k], data[k] = b.state, b.data
  txt = comp[k].as_text()
  print(k, "compile %.1fs" % (time.perf_counter() - t0),
        "onednn_conv", txt.count('"__onednn$convolution"'), "onednn_matmul", txt.count('"__onednn$matmul"'),
        "temp MiB %.1f" % (comp[k].memory_analysis().temp_size_in_bytes / 2**20), flush=True)
times = {k: [] for k in V}
print("load", os.getloadavg()[0], flush=True)
for r in range(rounds + 2):
  for k in V:
    t0 = time.perf_counter()
    st[k], m = jax.block_until_ready(comp[k](st[k], data[k]))
    if r >= 2:
      times[k].append(time.perf_counter() - t0)
    if r == 0:
      print(k, "loss", float(m["loss"]), "grad_norm", float(m["grad_norm"]), flush=True)
base = next(iter(V))
for k in times:
  print(k, "median img/s %.2f best %.2f ratio %.3f" % (
      batch / np.median(times[k]), batch / min(times[k]), np.median(times[base]) / np.median(times[k])))
print("load", os.getloadavg()[0])
