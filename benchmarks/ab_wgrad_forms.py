"""Session-7 experiment: the shipped step against one whose 3x3 stride-1 'SAME' convolutions
take their weight gradient as 9 grouped GEMMs over shifted slices of dy (custom_vjp), compiled
in one process and timed alternately.  python ab_wgrad_gemm.py densenet_bc_100 64 me 10 [G]"""
import math, os, sys, time
import numpy as np
sys.path.insert(0, "/work/main/benchmarks")
import _common  # noqa: F401
import flax.linen as nn
import jax, jax.numpy as jnp
import train_step as ts
from densenet_jax import models

DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def make_conv3x3(groups, barrier=False):
  def _wgrad(x, dy):
    n, h, w, ci = x.shape
    g = math.gcd(n, groups)
    p = jnp.pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
    xs = x.reshape(g, -1, ci)
    taps = [jnp.einsum("gmc,gmd->gcd", xs, p[:, 2 - i:2 - i + h, 2 - j:2 - j + w].reshape(g, -1, dy.shape[-1]))
            for i in range(3) for j in range(3)]
    t = jnp.stack(taps, 1)
    if barrier:
      t = jax.lax.optimization_barrier(t)
    return t.sum(0).reshape(3, 3, ci, dy.shape[-1])

  @jax.custom_vjp
  def conv3x3(x, w):
    return _conv(x, w)

  def _fwd(x, w):
    return _conv(x, w), (x, w)

  def _bwd(res, dy):
    x, w = res
    return jax.vjp(lambda x: _conv(x, w), x)[1](dy)[0], _wgrad(x, dy).astype(w.dtype)

  conv3x3.defvjp(_fwd, _bwd)
  return conv3x3


class GemmConv(models.Conv):
  conv3x3 = None
  @nn.compact
  def __call__(self, x):
    if (models._pair(self.kernel_size) != (3, 3) or models._pair(self.strides) != (1, 1)
        or self.padding not in ("SAME", 1, ((1, 1), (1, 1)))):
      return models.Conv.__call__(self, x)
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    # custom_vjp under shard_map: the kernel enters as varying as x, so the bwd rule's dw
    # matches it; the implicit pcast's transpose then sums dw over devices, as autodiff does.
    vary = lambda a: getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", frozenset())
    axes = tuple(vary(x) - vary(kernel))
    if axes:
      kernel = jax.lax.pcast(kernel, axes, to="varying")
    return type(self).conv3x3(x, kernel)


class Bcast1x1(models.Conv):
  groups = 8
  @nn.compact
  def __call__(self, x):
    if models._pair(self.kernel_size) != (1, 1) or models._pair(self.strides) != (1, 1):
      return super().__call__(x)
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    n, h, w, c = x.shape
    g = math.gcd(n, type(self).groups)
    wg = jnp.broadcast_to(kernel[0, 0], (g, c, self.features))
    y = jax.lax.dot_general(x.reshape(g, -1, c), wg, (((2,), (1,)), ((0,), (0,))))
    return y.reshape(n, h, w, self.features)


class Both(GemmConv):
  groups = 8
  conv3x3 = staticmethod(make_conv3x3(1))
  @nn.compact
  def __call__(self, x):
    if models._pair(self.kernel_size) == (1, 1):
      return Bcast1x1.__call__(self, x)
    return GemmConv.__call__(self, x)


def make_mm(groups, barrier=False):
  def mm(x, w):
    return jax.lax.dot_general(x, w, (((3,), (0,)), ((), ())))

  @jax.custom_vjp
  def f(x, w):
    return mm(x, w)

  def fwd(x, w):
    return mm(x, w), (x, w)

  def bwd(res, dy):
    x, w = res
    g = math.gcd(x.shape[0], groups)
    dw = jnp.einsum("gkc,gkd->gcd", x.reshape(g, -1, x.shape[-1]), dy.reshape(g, -1, dy.shape[-1]))
    if barrier:
      dw = jax.lax.optimization_barrier(dw)
    dw = dw.sum(0)
    return jax.lax.dot_general(dy, w, (((3,), (1,)), ((), ()))), dw.astype(w.dtype)

  f.defvjp(fwd, bwd)
  return f


class Split1x1(models.Conv):
  mm = staticmethod(make_mm(8))
  conv3x3 = None
  @nn.compact
  def __call__(self, x):
    if models._pair(self.kernel_size) != (1, 1) or models._pair(self.strides) != (1, 1):
      if type(self).conv3x3 is not None:
        return GemmConv.__call__(self, x)
      return super().__call__(x)
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    vary = lambda a: getattr(getattr(jax.typeof(a), "manual_axis_type", None), "varying", frozenset())
    axes = tuple(vary(x) - vary(kernel))
    k = kernel[0, 0]
    if axes:
      k = jax.lax.pcast(k, axes, to="varying")
    return type(self).mm(x, k)


import numpy as onp

def _np_wgrad1x1(x, dy):
  x = onp.asarray(x); dy = onp.asarray(dy)
  return x.reshape(-1, x.shape[-1]).T @ dy.reshape(-1, dy.shape[-1])

def _np_wgrad3x3(xp, dyp, wp2):
  xp = onp.asarray(xp); dyp = onp.asarray(dyp)
  R = dyp.shape[0]
  return onp.stack([xp[i * wp2 + j:i * wp2 + j + R].T @ dyp for i in range(3) for j in range(3)])

def _vary_like(out, x):
  v = getattr(getattr(jax.typeof(x), "manual_axis_type", None), "varying", frozenset())
  o = getattr(getattr(jax.typeof(out), "manual_axis_type", None), "varying", frozenset())
  ax = tuple(v - o)
  return jax.lax.pcast(out, ax, to="varying") if ax else out

def cb_wgrad1x1(x, dy):
  return _vary_like(_cb1(x, dy), x)

def _cb1(x, dy):
  return jax.pure_callback(_np_wgrad1x1, jax.ShapeDtypeStruct((x.shape[-1], dy.shape[-1]), x.dtype), x, dy)

def cb_wgrad3x3(x, dy):
  n, h, w, c = x.shape
  d = dy.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).reshape(-1, c)
  xp = jnp.pad(xp, ((0, 2 * (w + 2) + 2), (0, 0)))
  dyp = jnp.pad(dy, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, d)
  import functools
  out = jax.pure_callback(functools.partial(_np_wgrad3x3, wp2=w + 2), jax.ShapeDtypeStruct((9, c, d), x.dtype), xp, dyp)
  return _vary_like(out.reshape(3, 3, c, d), x)

def make_cb_conv3x3():
  @jax.custom_vjp
  def conv3x3(x, w):
    return _conv(x, w)
  def _fwd(x, w):
    return _conv(x, w), (x, w)
  def _bwd(res, dy):
    x, w = res
    return jax.vjp(lambda x: _conv(x, w), x)[1](dy)[0], cb_wgrad3x3(x, dy).astype(w.dtype)
  conv3x3.defvjp(_fwd, _bwd)
  return conv3x3

def make_cb_mm():
  def mm(x, w):
    return jax.lax.dot_general(x, w, (((3,), (0,)), ((), ())))
  @jax.custom_vjp
  def f(x, w):
    return mm(x, w)
  def fwd(x, w):
    return mm(x, w), (x, w)
  def bwd(res, dy):
    x, w = res
    return jax.lax.dot_general(dy, w, (((3,), (1,)), ((), ()))), cb_wgrad1x1(x, dy).astype(w.dtype)
  f.defvjp(fwd, bwd)
  return f

V = {"shipped": {}}
for v in sys.argv[5].split(","):
  if v.startswith("g"):
    V[v] = {"conv": type(f"GemmConv{v}", (GemmConv,), {"conv3x3": staticmethod(make_conv3x3(int(v[1:])))})}
  if v.startswith("b") and v != "both" and not v.startswith("bb"):
    V[v] = {"conv": type(f"Bcast{v}", (Bcast1x1,), {"groups": int(v[1:])})}
  if v == "both":
    V[v] = {"conv": Both}
  if v.startswith("s") and not v.startswith("sb"):
    V[v] = {"conv": type(f"Split{v}", (Split1x1,), {"mm": staticmethod(make_mm(int(v[1:])))})}
  if v.startswith("sb"):
    V[v] = {"conv": type(f"SplitB{v}", (Split1x1,), {"mm": staticmethod(make_mm(int(v[2:]), True))})}
  if v.startswith("allb"):
    V[v] = {"conv": type("AllB", (Split1x1,), {"mm": staticmethod(make_mm(int(v[4:]), True)), "conv3x3": staticmethod(make_conv3x3(1))})}
  if v.startswith("bb"):
    V[v] = {"conv": type("BB", (Split1x1,), {"mm": staticmethod(make_mm(8, True)), "conv3x3": staticmethod(make_conv3x3(int(v[2:]), True))})}
  if v == "cb":
    V[v] = {"conv": type("CB", (Split1x1,), {"mm": staticmethod(make_cb_mm()), "conv3x3": staticmethod(make_cb_conv3x3())})}
  if v == "cb3":
    V[v] = {"conv": type("CB3", (GemmConv,), {"conv3x3": staticmethod(make_cb_conv3x3())})}
  if v == "all":
    V[v] = {"conv": type("All", (Split1x1,), {"conv3x3": staticmethod(make_conv3x3(1))})}
model, batch, me, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "me", int(sys.argv[4])
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
