"""Session-5 experiment (removed after its note in docs/performance.md): the train step as
shipped before session 5, with oneDNN custom calls, and with oneDNN plus an optimisation
barrier on every spatial convolution input, compiled in one process and timed alternately.

    python benchmarks/ab_onednn_barrier.py densenet_bc_100 64 me 10
"""
import sys, time, numpy as np, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (puts the repo root on sys.path)
import jax, flax.linen as nn, train_step as ts
from densenet_jax import models
ts.train.COMPILER_OPTIONS = {}  # the step as before session 5; the variants add the options
class BarrierConv(models.Conv):
  @nn.compact
  def __call__(self, x):
    if models._pair(self.kernel_size) != (1, 1):
      x = jax.lax.optimization_barrier(x)
    return super().__call__(x)
model, batch, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]=='me'
rounds=int(sys.argv[4])
OPTS={'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_custom_call': True}
V={'base':({},None),'onednn':({},OPTS),'barrier+onednn':({'conv':BarrierConv},OPTS)}
b={k: ts.build(model,batch,memory_efficient=me,**o) for k,(o,_) in V.items()}
comp={k: b[k].step.lower(b[k].state,b[k].data).compile(V[k][1]) for k in V}
st={k:b[k].state for k in V}; times={k:[] for k in V}
print('load', os.getloadavg()[0])
for r in range(rounds+2):
  for k in V:
    t0=time.perf_counter(); st[k],m=jax.block_until_ready(comp[k](st[k],b[k].data))
    if r>=2: times[k].append(time.perf_counter()-t0)
    if r==0: print(k,'loss',float(m['loss']))
for k in times: print(k,'median img/s %.2f best %.2f ratio %.3f'%(batch/np.median(times[k]),batch/min(times[k]), np.median(times['base'])/np.median(times[k])))
print('load', os.getloadavg()[0])
