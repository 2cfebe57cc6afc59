"""Do oneDNN (and YNNPACK) library calls inside an XLA:CPU executable use both cores?
Run as is and under `taskset -c 0`; equal times mean one thread."""
import time, numpy as np, jax, jax.numpy as jnp
import sys
sys.path.insert(0, "/work/main")
from train.step import COMPILER_OPTIONS
opts = COMPILER_OPTIONS["cpu"]
def bench(c, *a, n=15):
  c(*a); t = []
  for _ in range(n):
    t0 = time.perf_counter(); jax.block_until_ready(c(*a)); t.append(time.perf_counter() - t0)
  return 1e3 * np.median(t)
k = jax.random.key(0)
x = jax.random.normal(k, (64, 32, 32, 192)); w1 = jax.random.normal(k, (192, 48))
y = jax.random.normal(k, (64, 32, 32, 48)); w3 = jax.random.normal(k, (3, 3, 48, 12))
dy = jax.random.normal(k, (64, 32, 32, 12))
mm = lambda x, w: jnp.einsum("nhwc,cd->nhwd", x, w)
conv = lambda y, w: jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
wgrad = lambda y, dy: jax.vjp(lambda w: conv(y, w), w3)[1](dy)[0]
red = lambda x: jnp.mean(x, (0, 1, 2))
for name, f, a in (("1x1 matmul", mm, (x, w1)), ("3x3 conv fwd", conv, (y, w3)),
                   ("3x3 wgrad", wgrad, (y, dy)), ("reduce", red, (x,))):
  c = jax.jit(f).lower(*a).compile(opts)
  txt = c.as_text()
  lib = "onednn" if "__onednn" in txt else ("ynn" if "ynn" in txt else "xla")
  print(f"{name:14s} {lib:7s} {bench(c, *a):8.2f} ms")
