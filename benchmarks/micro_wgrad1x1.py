"""Session-6 scratch (removed after its note): the 1x1 weight gradient [65536,204]^T x [65536,48]
with BN+ReLU recomputed in front, written four ways, with and without the step's CPU options.
"""
import jax, jax.numpy as jnp, numpy as np, time, sys
import os; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import step
M,C,K = 65536, 204, 48
rng=np.random.default_rng(0)
x=jnp.asarray(rng.standard_normal((M,C),np.float32)); dy=jnp.asarray(rng.standard_normal((M,K),np.float32))
a=jnp.asarray(rng.standard_normal((C,),np.float32)); bb=jnp.asarray(rng.standard_normal((C,),np.float32))
prod=lambda x: jnp.maximum(x*a+bb,0)
def cur(x,dy): return jax.lax.dot_general(prod(x),dy,(((0,),(0,)),((),())))
def swap(x,dy): return jax.lax.dot_general(dy,prod(x),(((0,),(0,)),((),()))).T
def batched(nb):
    def f(x,dy):
        return jnp.einsum('bmc,bmk->ck', prod(x).reshape(nb,M//nb,C), dy.reshape(nb,M//nb,K))
    f.__name__=f'einsum{nb}'; return f
def bsum(nb):
    def f(x,dy):
        return jnp.einsum('bmc,bmk->bck', prod(x).reshape(nb,M//nb,C), dy.reshape(nb,M//nb,K)).sum(0)
    f.__name__=f'bsum{nb}'; return f
def noprod(x,dy): return jax.lax.dot_general(x,dy,(((0,),(0,)),((),())))
ref=jax.jit(cur, compiler_options={})(x,dy)
fs={}
for fn in (cur, swap, bsum(16), bsum(64), noprod):
    for nm,o in (("onednn",step.COMPILER_OPTIONS["cpu"]),("default",{})):
        c=jax.jit(fn).lower(x,dy).compile(o); r=c(x,dy)
        if fn is not noprod: assert float(jnp.max(jnp.abs(r-ref))/jnp.max(jnp.abs(ref)))<1e-4
        fs[(fn.__name__,nm)]=c
T={k:[] for k in fs}
for r in range(12):
    for k,c in fs.items():
        t=time.perf_counter(); jax.block_until_ready(c(x,dy)); T[k].append(time.perf_counter()-t)
for k,v in T.items(): print(k, 'median ms %.2f min %.2f'%(1e3*np.median(v),1e3*min(v)))
