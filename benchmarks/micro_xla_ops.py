import time, sys, numpy as np, jax, jax.numpy as jnp
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
g1 = jax.random.normal(k, (64, 32, 32, 48))
y = jax.random.normal(k, (64, 32, 32, 48)); w3 = jax.random.normal(k, (3, 3, 48, 12))
dy = jax.random.normal(k, (64, 32, 32, 12))
conv = lambda y, w: jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
dgrad = lambda w, dy: jax.vjp(lambda y: conv(y, w), y)[1](dy)[0]
mm_dgrad = lambda g, w: jnp.einsum("nhwd,cd->nhwc", g, w)
mm_wgrad = lambda x, g: jnp.einsum("nhwc,nhwd->cd", x, g)
for name, f, a in (("3x3 dgrad", dgrad, (w3, dy)), ("1x1 dgrad", mm_dgrad, (g1, w1)), ("1x1 wgrad", mm_wgrad, (x, g1))):
  c = jax.jit(f).lower(*a).compile(opts)
  txt = c.as_text()
  lib = "onednn" if "__onednn" in txt else ("ynn" if "ynn" in txt else "xla")
  print(f"{name:14s} {lib:7s} {bench(c, *a):8.2f} ms")
