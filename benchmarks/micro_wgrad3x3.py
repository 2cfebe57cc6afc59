"""Session-6 scratch (removed after its note): the 3x3 weight gradient of a 64x32x32x48 -> 12
convolution with BN+ReLU recomputed in front, as XLA writes it and with dy and x swapped, each
under YNNPACK and under oneDNN convolutions.
"""
import jax, jax.numpy as jnp, numpy as np, time, sys
from jax import lax
N,H,W,C,K = 64,32,32,48,12
rng=np.random.default_rng(0)
x=jnp.asarray(rng.standard_normal((N,H,W,C),np.float32)); dy=jnp.asarray(rng.standard_normal((N,H,W,K),np.float32))
a=jnp.asarray(rng.standard_normal((C,),np.float32)); bb=jnp.asarray(rng.standard_normal((C,),np.float32))
w=jnp.asarray(rng.standard_normal((3,3,C,K),np.float32))
def prod(x): return jnp.maximum(x*a+bb,0)
def std(x,dy):   # XLA's own transpose of the conv
    return jax.vjp(lambda w: lax.conv_general_dilated(prod(x),w,(1,1),'SAME',dimension_numbers=('NHWC','HWIO','NHWC')), w)[1](dy)[0]
def swapped(x,dy):
    # out[k, i, j, c] = sum_{n,h,w} dy[n,h,w,k] * xp[n,h+i,w+j,c]  (i,j in 0..2), xp padded by 1
    xp = prod(x)
    out = lax.conv_general_dilated(dy, xp, window_strides=(1,1), padding=((1,1),(1,1)),
        dimension_numbers=lax.ConvDimensionNumbers(lhs_spec=(3,0,1,2), rhs_spec=(3,0,1,2), out_spec=(0,3,1,2)))
    # lhs: batch=dim3 (K), feature=dim0 (N), spatial=1,2 ; rhs: out feature=dim3(C), in feature=dim0(N), spatial 1,2
    # out: batch=K at dim0, feature=C at dim3, spatial 1,2 -> [K,3,3,C]; this is correlation of dy with xp -> flip
    return jnp.transpose(out[:, ::-1, ::-1, :], (1,2,3,0))
ref = jax.jit(std)(x,dy)
opts_ynn = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True}
opts_dnn = {**opts_ynn, "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
fs={}
for fn in (std, swapped):
    for nm,o in (("ynn",opts_ynn),("onednn",opts_dnn)):
        c=jax.jit(fn).lower(x,dy).compile(o)
        r=c(x,dy); err=float(jnp.max(jnp.abs(r-ref))/jnp.max(jnp.abs(ref)))
        fs[(fn.__name__,nm)]=c; print(fn.__name__,nm,'relerr',err)
T={k:[] for k in fs}
for r in range(15):
    for k,c in fs.items():
        t=time.perf_counter(); jax.block_until_ready(c(x,dy)); T[k].append(time.perf_counter()-t)
for k,v in T.items(): print(k, 'median ms %.2f min %.2f'%(1e3*np.median(v),1e3*min(v)))
