import ctypes, ctypes.util, json, os, resource, sys
if sys.argv[1] == "keep":
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  assert all(libc.mallopt(p, v) == 1 for p, v in ((-8, 1), (-4, 0), (-1, 2**31 - 1)))
sys.path.insert(0, "/work/main/benchmarks"); sys.path.insert(0, "/work/main")
import _common  # noqa
import jax, time
import train_step as ts
b = ts.build("densenet_bc_100", 32, memory_efficient=True, block_config=(3, 3, 3))
t0 = time.time(); c = b.step.lower(b.state, b.data).compile()
temp = c.memory_analysis().temp_size_in_bytes / 4096
st = b.state; out = []
for i in range(10):
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  st, m = jax.block_until_ready(c(st, b.data))
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sys.argv[1], "compile %.1f" % (time.time() - t0), "temp pages", temp, out)
