import json, resource, sys
sys.path.insert(0, "/work/main")
if sys.argv[1] == "keep":
  from train import host_memory
  assert host_memory.keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32)
f = jax.jit(lambda x: jnp.cos(jax.lax.optimization_barrier(jnp.sin(x) * x)).sum())
c = f.lower(x).compile()
out = []
for _ in range(12):
  b0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(c(x))
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - b0)
print(sys.argv[1], out)
