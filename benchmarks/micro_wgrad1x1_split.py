import time, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/main")
from train.step import COMPILER_OPTIONS
opts = COMPILER_OPTIONS["cpu"]
C = int(sys.argv[1]) if len(sys.argv) > 1 else 192
k = jax.random.key(0)
x = jax.random.normal(k, (64, 32, 32, C)); g = jax.random.normal(jax.random.key(1), (64, 32, 32, 48))
K = 64 * 32 * 32
bar = jax.lax.optimization_barrier
def split(G):
  return lambda x, g: jnp.einsum("gkc,gkd->gcd", x.reshape(G, -1, C), g.reshape(G, -1, 48)).sum(0)
V = {"tn": lambda x, g: jnp.einsum("nhwc,nhwd->cd", x, g)}
for G in (2, 4, 8, 16, 64, 256):
  V[f"split{G}"] = split(G)
comp = {n: jax.jit(f).lower(x, g).compile(opts) for n, f in V.items()}
ref = np.asarray(comp["tn"](x, g))
T = {n: [] for n in V}
for r in range(12):
  for n, c in comp.items():
    t0 = time.perf_counter(); jax.block_until_ready(c(x, g)); T[n].append(time.perf_counter() - t0)
for n, c in comp.items():
  err = np.abs(np.asarray(c(x, g)) - ref).max() / np.abs(ref).max()
  print(f"{n:10s} {1e3*np.median(T[n][2:]):7.2f} ms  err {err:.1e}  mm {c.as_text().count('__onednn$matmul')}")
