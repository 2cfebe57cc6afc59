"""3x3 weight gradient forms under the shipped CPU options (oneDNN), timed alternately."""
import time, sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/work/main")
from train.step import COMPILER_OPTIONS
opts = COMPILER_OPTIONS["cpu"]
N, H, W, CI, CO = (int(a) for a in (sys.argv[1:6] if len(sys.argv) > 5 else (64, 32, 32, 48, 12)))
k = jax.random.key(0)
x = jax.random.normal(k, (N, H, W, CI)); dy = jax.random.normal(jax.random.key(1), (N, H, W, CO))
w3 = jnp.zeros((3, 3, CI, CO))
conv = lambda y, w: jax.lax.conv_general_dilated(y, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
def xla(x, dy):
  return jax.vjp(lambda w: conv(x, w), w3)[1](dy)[0]
def shifted_dy(dy):  # [N,H,W,9,CO]: tap (kh,kw) of dy_pad aligned with x
  p = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([p[:, 2 - kh:2 - kh + H, 2 - kw:2 - kw + W] for kh in range(3) for kw in range(3)], axis=3)
def gemm_tn(x, dy):
  d = shifted_dy(dy).reshape(N * H * W, 9 * CO)
  g = jnp.dot(x.reshape(N * H * W, CI).T, d)           # [CI, 9*CO]
  return g.reshape(CI, 3, 3, CO).transpose(1, 2, 0, 3)
def gemm_nt(x, dy):  # [9*CO, NHW] x [NHW, CI]
  d = shifted_dy(dy).reshape(N * H * W, 9 * CO)
  g = jnp.dot(d.T, x.reshape(N * H * W, CI))           # [9*CO, CI]
  return g.reshape(3, 3, CO, CI).transpose(0, 1, 3, 2)
def nine_dots(x, dy):
  p = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  xs = x.reshape(N * H * W, CI)
  return jnp.stack([jnp.dot(xs.T, p[:, 2 - kh:2 - kh + H, 2 - kw:2 - kw + W].reshape(-1, CO))
                    for kh in range(3) for kw in range(3)]).reshape(3, 3, CI, CO)
def shifted_x(x, dy):  # shift the (wider) x instead: [NHW, 9*CI] x [NHW, CO]
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  xs = jnp.stack([p[:, kh:kh + H, kw:kw + W] for kh in range(3) for kw in range(3)], axis=3)
  return jnp.dot(xs.reshape(-1, 9 * CI).T, dy.reshape(-1, CO)).reshape(3, 3, CI, CO)
def gemm_tn_g(G):
  def f(x, dy):
    d = shifted_dy(dy).reshape(G, N * H * W // G, 9 * CO)
    g = jnp.einsum("gmc,gmd->cd", x.reshape(G, -1, CI), d)
    return g.reshape(CI, 3, 3, CO).transpose(1, 2, 0, 3)
  return f
def gemm_tn_gb(G):
  def f(x, dy):
    d = shifted_dy(dy).reshape(G, N * H * W // G, 9 * CO)
    g = jnp.einsum("gmc,gmd->gcd", x.reshape(G, -1, CI), d).sum(0)
    return g.reshape(CI, 3, 3, CO).transpose(1, 2, 0, 3)
  return f
def nine_g(G):
  def f(x, dy):
    p = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xs = x.reshape(G, -1, CI)
    return jnp.stack([jnp.einsum("gmc,gmd->gcd", xs, p[:, 2 - kh:2 - kh + H, 2 - kw:2 - kw + W].reshape(G, -1, CO)).sum(0)
                      for kh in range(3) for kw in range(3)]).reshape(3, 3, CI, CO)
  return f
V = {"xla": xla, "gemm_tn": gemm_tn, "nine_dots": nine_dots, "gtn8": gemm_tn_gb(8), "gtn64": gemm_tn_gb(64), "gtn64c": gemm_tn_g(64), "nine8": nine_g(8), "nine64": nine_g(64)}
C = {}
ref = None
for n, f in V.items():
  C[n] = jax.jit(f).lower(x, dy).compile(opts)
  r = np.asarray(C[n](x, dy)); ref = r if ref is None else ref
  txt = C[n].as_text()
  print(n, "max rel err %.1e" % (np.abs(r - ref).max() / np.abs(ref).max()), "onednn mm", txt.count('"__onednn$matmul"'), "conv", txt.count('"__onednn$convolution"'), flush=True)
T = {n: [] for n in V}
for r in range(12):
  for n in V:
    t0 = time.perf_counter(); jax.block_until_ready(C[n](x, dy)); T[n].append(time.perf_counter() - t0)
for n in V:
  print(f"{n:10s} {1e3*np.median(T[n][2:]):7.2f} ms")
