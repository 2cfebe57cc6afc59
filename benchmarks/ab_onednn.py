"""Session-5 experiment (removed after its note in docs/performance.md): the same train step compiled
with and without oneDNN custom calls, timed alternately in one process.

    python benchmarks/ab_onednn.py densenet_bc_100 64 me 10
"""
import sys, time, numpy as np
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (puts the repo root on sys.path)
import jax, train_step as ts
model, batch, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]=='me'
rounds=int(sys.argv[4]) if len(sys.argv)>4 else 10
OPTS={'xla_cpu_use_onednn': True, 'xla_cpu_experimental_onednn_custom_call': True}
b={k: ts.build(model,batch,memory_efficient=me) for k in ('base','onednn')}
comp={k: v.step.lower(v.state,v.data).compile(OPTS if k=='onednn' else None) for k,v in b.items()}
st={k:v.state for k,v in b.items()}
times={k:[] for k in b}
for r in range(rounds+2):
  for k in b:
    t0=time.perf_counter(); st[k],m=jax.block_until_ready(comp[k](st[k],b[k].data))
    if r>=2: times[k].append(time.perf_counter()-t0)
    if r==0: print(k,'loss',float(m['loss']),'gnorm',float(m['grad_norm']))
for k in times: print(k,'median img/s %.2f best %.2f'%(batch/np.median(times[k]),batch/min(times[k])))
print('ratio onednn/base %.3f'%(np.median(times['base'])/np.median(times['onednn'])))
