"""Session-7 experiment: XLA:CPU compile options on top of the shipped CPU step, compiled in one
process and timed alternately.  python ab_flags.py densenet_bc_100 64 me 8  (VARIANTS=a,b)"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, "/work/main/benchmarks")
import _common  # noqa: F401
import jax
import train_step as ts
from train import step as train_step_module

model, batch, me, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "me", int(sys.argv[4])
shipped = dict(train_step_module.COMPILER_OPTIONS["cpu"])
train_step_module.COMPILER_OPTIONS = {}
V = {"shipped": shipped,
     "mlir_tiling": {**shipped, "xla_cpu_enable_mlir_tiling_and_fusion": True},
     "fusion_emitters_off": {**shipped, "xla_cpu_use_fusion_emitters": False},
     "fusion_emitters_on": {**shipped, "xla_cpu_use_fusion_emitters": True},
     "xtile": {**shipped, "xla_cpu_use_new_xtile_lowering": True},
     "fast_runtime": {**shipped, "xla_cpu_opt_preset": "CPU_OPT_PRESET_FAST_RUNTIME"},
     "no_unroll": {**shipped, "xla_cpu_disable_loop_unrolling": True},
     "mlir_outlining_off": {**shipped, "xla_cpu_enable_mlir_fusion_outlining": False},
     }
only = os.environ.get("VARIANTS")
if only:
  V = {k: V[k] for k in only.split(",")}
b = ts.build(model, batch, memory_efficient=me)
comp = {}
for k, opts in list(V.items()):
  t0 = time.perf_counter()
  try:
    comp[k] = b.step.lower(b.state, b.data).compile(opts)
  except Exception as e:  # an option this jaxlib rejects
    print(k, "REJECTED", str(e).splitlines()[0][:200], flush=True)
    del V[k]
    continue
  txt = comp[k].as_text()
  print(k, "compile %.1fs" % (time.perf_counter() - t0), "fusions", txt.count(" fusion("),
        "temp MiB %.1f" % (comp[k].memory_analysis().temp_size_in_bytes / 2**20), flush=True)
st = {k: jax.tree.map(lambda x: x.copy(), b.state) for k in V}
times = {k: [] for k in V}
print("load", os.getloadavg()[0], flush=True)
for r in range(rounds + 2):
  for k in V:
    t0 = time.perf_counter()
    st[k], m = jax.block_until_ready(comp[k](st[k], b.data))
    if r >= 2:
      times[k].append(time.perf_counter() - t0)
    if r == 0:
      print(k, "loss", float(m["loss"]), flush=True)
base = next(iter(V))
for k in times:
  print(k, "median img/s %.2f best %.2f ratio %.3f" % (
      batch / np.median(times[k]), batch / min(times[k]), np.median(times[base]) / np.median(times[k])))
print("load", os.getloadavg()[0])
