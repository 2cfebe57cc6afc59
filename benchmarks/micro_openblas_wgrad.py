import time, numpy as np
np.show_config() if False else None
rng = np.random.default_rng(0)
def t(f, n=10):
  f(); T=[]
  for _ in range(n):
    t0=time.perf_counter(); f(); T.append(time.perf_counter()-t0)
  return 1e3*np.median(T)
for C in (60, 204):
  x = rng.standard_normal((65536, C), dtype=np.float32); dy = rng.standard_normal((65536, 48), dtype=np.float32)
  print("1x1 wgrad C=%d  x.T@dy %.1f ms" % (C, t(lambda: x.T @ dy)))
xp = rng.standard_normal((64*34*34+80, 48), dtype=np.float32); dyp = rng.standard_normal((64*34*34, 12), dtype=np.float32)
def nine():
  for i in range(3):
    for j in range(3):
      o = i*34+j
      xp[o:o+dyp.shape[0]].T @ dyp
print("3x3 wgrad nine strided GEMMs %.1f ms" % t(nine))
