"""Session-6 experiment: the shipped CPU step (oneDNN matmuls) against the same step with
XLA:CPU's YNNPACK convolution fusions turned off, so that oneDNN's convolution rewriter takes
the 3x3 convolutions (forward, input gradient and weight gradient). All variants are compiled
in one process and timed alternately.

    python benchmarks/ab_ynn_onednn_conv.py densenet_bc_100 64 me 10
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: F401  (puts the repo root on sys.path)
import jax
import train_step as ts
from train import step as train_step_module

model, batch, me, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "me", int(sys.argv[4])
shipped = dict(train_step_module.COMPILER_OPTIONS["cpu"])
train_step_module.COMPILER_OPTIONS = {}  # each variant passes its own options at compile time
YNN = "xla_cpu_experimental_ynn_fusion_type"
DOT, REDUCE, ELTWISE = ("LIBRARY_FUSION_TYPE_" + t for t in ("INDIVIDUAL_DOT", "REDUCE", "ELTWISE"))
# YNNPACK's default list is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION and REDUCE (read off the
# compiled HLO); leaving INDIVIDUAL_CONVOLUTION out hands the convolutions to oneDNN.
V = {"shipped": shipped,
     "conv_onednn": {**shipped, YNN: f"{DOT},{REDUCE}"},
     "conv_onednn_ynn_eltwise": {**shipped, YNN: f"{DOT},{REDUCE},{ELTWISE}"},
     "ynn_dot_only": {**shipped, YNN: DOT},
     "ynn_reduce_only": {**shipped, YNN: REDUCE},
     "ynn_off": {**shipped, YNN: ""},
     # on top of the options shipped after this experiment (YNNPACK: reductions only)
     "tiling": {**shipped, YNN: REDUCE, "xla_cpu_experimental_enable_tiling_propagation": True},
     "onednn_eltwise": {**shipped, YNN: REDUCE,
                        "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_ELTWISE"}}
only = os.environ.get("VARIANTS")
if only:
  V = {k: V[k] for k in only.split(",")}
b = ts.build(model, batch, memory_efficient=me)
comp = {}
for k, opts in V.items():
  t0 = time.perf_counter()
  comp[k] = b.step.lower(b.state, b.data).compile(opts)
  txt = comp[k].as_text()
  print(k, "compile %.1fs" % (time.perf_counter() - t0), "onednn_conv", txt.count('"__onednn$convolution"'),
        "onednn_matmul", txt.count('"__onednn$matmul"'), "ynn", txt.count("__ynn_fusion"), "onednn_fusion", txt.count('"__onednn_fusion"'),
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
      print(k, "loss", float(m["loss"]), "grad_norm", float(m.get("grad_norm", np.nan)), flush=True)
base = next(iter(V))
for k in times:
  print(k, "median img/s %.2f best %.2f ratio %.3f" % (
      batch / np.median(times[k]), batch / min(times[k]), np.median(times[base]) / np.median(times[k])))
print("load", os.getloadavg()[0])
