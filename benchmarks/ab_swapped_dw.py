"""Session-5 experiment (removed after its note in docs/performance.md). A/B: 3x3 weight gradient with dy as lhs (custom_jvp + linear_call) vs XLA default."""
import sys, time, functools, numpy as np
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (puts the repo root on sys.path)
import jax, jax.numpy as jnp, flax.linen as nn
from jax import lax
from jax.custom_derivatives import linear_call
import train_step as ts
from densenet_jax import models

DN = ('NHWC', 'HWIO', 'NHWC')
def _conv(x, w, padding):
  return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=DN)

def _dw_swapped(x, dy, padding, ksize):
  # out[kh', kw', ci, co] = sum_{n,h,w} dy_pad[n, kh'+h, kw'+w, co] x[n,h,w,ci]; dW[kh] = out[K-1-kh]
  (pl0, ph0), (pl1, ph1) = padding
  dn = lax.ConvDimensionNumbers(lhs_spec=(3, 0, 1, 2), rhs_spec=(3, 0, 1, 2), out_spec=(3, 2, 0, 1))
  kh, kw = ksize
  o = lax.conv_general_dilated(dy, x, (1, 1), ((kh - 1 - pl0, kh - 1 - ph0), (kw - 1 - pl1, kw - 1 - ph1)), dimension_numbers=dn)
  return o[::-1, ::-1]

@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv3(x, w, padding):
  return _conv(x, w, padding)

@conv3.defjvp
def _conv3_jvp(padding, primals, tangents):
  x, w = primals; dx, dw = tangents
  y = _conv(x, w, padding)
  one = lax.stop_gradient(x[0, 0, 0, 0] * 0 + 1)  # makes dw as varying as x under shard_map
  dw = dw * one
  ty = linear_call(lambda x, dw: _conv(x, dw, padding),
                   lambda x, ct: _dw_swapped(x, ct, padding, w.shape[:2]), x, dw)
  ty = ty + _conv(dx, w, padding)
  return y, ty

class SwapConv(models.Conv):
  @nn.compact
  def __call__(self, x):
    ks = models._pair(self.kernel_size)
    if ks == (3, 3) and models._pair(self.strides) == (1, 1) and self.padding == 'SAME' and self.feature_group_count == 1:
      kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
      x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
      return conv3(x, kernel, ((1, 1), (1, 1)))
    return super().__call__(x)

if __name__ == '__main__':
  model, batch, me = sys.argv[1], int(sys.argv[2]), sys.argv[3] == 'me'
  rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 12
  builds = {'base': ts.build(model, batch, memory_efficient=me),
            'swap': ts.build(model, batch, memory_efficient=me, conv=SwapConv)}
  comp = {}
  for k, b in builds.items():
    comp[k] = b.step.lower(b.state, b.data).compile()
    print(k, 'temp MiB', comp[k].memory_analysis().temp_size_in_bytes / 2**20, flush=True)
  st = {k: b.state for k, b in builds.items()}
  # same init? compare one step's loss
  times = {k: [] for k in builds}
  for r in range(rounds + 2):
    for k in builds:
      t0 = time.perf_counter()
      st[k], m = jax.block_until_ready(comp[k](st[k], builds[k].data))
      if r >= 2: times[k].append(time.perf_counter() - t0)
      if r == 0: print(k, 'loss', float(m['loss']))
  for k in times:
    print(k, 'median img/s %.2f' % (batch / np.median(times[k])), 'best %.2f' % (batch / min(times[k])))
  print('ratio swap/base %.3f' % (np.median(times['base']) / np.median(times['swap'])))

# usage: python benchmarks/ab_swapped_dw.py densenet_bc_100 64 me 12
