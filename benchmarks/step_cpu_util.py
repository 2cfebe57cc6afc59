"""CPU time per wall time of the shipped BC-100 step: are both cores busy?"""
import os, sys, time, resource
sys.path.insert(0, "/work/main/benchmarks")
import _common  # noqa
import jax
import train_step as ts
b = ts.build("densenet_bc_100", 64, memory_efficient=True)
c = b.step.lower(b.state, b.data).compile()
st = b.state
for _ in range(2):
  st, m = jax.block_until_ready(c(st, b.data))
r0 = resource.getrusage(resource.RUSAGE_SELF); t0 = time.perf_counter()
for _ in range(6):
  st, m = jax.block_until_ready(c(st, b.data))
r1 = resource.getrusage(resource.RUSAGE_SELF); t1 = time.perf_counter()
wall = t1 - t0; u = r1.ru_utime - r0.ru_utime; s = r1.ru_stime - r0.ru_stime
print(f"minflt/step {(r1.ru_minflt-r0.ru_minflt)/6:.0f} majflt {r1.ru_majflt-r0.ru_majflt} nvcsw/step {(r1.ru_nvcsw-r0.ru_nvcsw)/6:.0f} nivcsw/step {(r1.ru_nivcsw-r0.ru_nivcsw)/6:.0f} wall {wall:.2f}s user {u:.2f}s sys {s:.2f}s cores busy {(u+s)/wall:.2f} img/s {6*64/wall:.1f} load {os.getloadavg()[0]:.2f}")
