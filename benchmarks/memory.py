"""Training-step working memory, default vs memory_efficient: XLA memory_analysis() temp bytes.

`densenet_jax.summary.train_step_temp_bytes` compiles a forward+backward step on abstract inputs
(no data); its temp bytes are the activations kept for the backward pass plus scratch. Rows:

  named   BC-100 / BC-250 / BC-190 at batch 64 (32x32), DenseNet-121/169/201 at batch 32 (224x224)
  sweep   DenseNet-BC k=12 at L = 40 ... 250, batch 64: quadratic (default) vs linear
          (memory_efficient) growth with depth, fitted and plotted to --plot

Deterministic for a jaxlib, not affected by load; all of it compiles for ~45 min on 2 cores.

    python benchmarks/memory.py --plot benchmarks/memory_vs_depth.png
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMED = (("densenet_bc_100", 64), ("densenet_bc_250", 64), ("densenet_bc_190", 64),
         ("densenet121", 32), ("densenet169", 32), ("densenet201", 32))
SWEEP_DEPTHS = (40, 64, 100, 136, 172, 208, 250)


def measure(name: str, batch: int, depth: int | None = None) -> dict[str, Any]:
  """Temp MiB of one model's step in both modes (`depth`: a DenseNet-BC k=12 of the sweep)."""
  from densenet_jax import models, summary  # pylint: disable=g-import-not-at-top
  model = models.densenet_cifar(depth, 12) if depth else models.get_model(name)
  shape = models.native_input_shape(model, batch)
  t0 = time.perf_counter()
  mib = [summary.train_step_temp_bytes(model.clone(memory_efficient=e), shape) / 2**20
         for e in (False, True)]
  return {"bench": "memory", "set": "sweep" if depth else "named", "model": name,
          "depth": model.depth, "k": model.growth_rate, "batch": batch,
          "default_mib": round(mib[0], 1), "efficient_mib": round(mib[1], 1),
          "ratio": round(mib[1] / mib[0], 3), "compile_s": round(time.perf_counter() - t0, 1)}


def fit(sweep: list[dict[str, Any]]) -> dict[str, Any]:
  """Per mode: a straight line's R^2, and the deepest net's share that an L^2 term explains."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  d = np.array([r["depth"] for r in sweep], float)
  out = {"bench": "memory_fit"}
  for key in ("default_mib", "efficient_mib"):
    y = np.array([r[key] for r in sweep], float)
    line = np.polyfit(d, y, 1)
    resid = y - np.polyval(line, d)
    quad = np.polyfit(d, y, 2)
    out[key] = {"linear_r2": round(1 - float(resid @ resid) / float(((y - y.mean())**2).sum()), 4),
                "quadratic_share": round(float(quad[0] * d[-1]**2 / y[-1]), 3),
                "mib_per_depth": round(float(line[0]), 2)}
  return out


def plot(sweep: list[dict[str, Any]], path: str) -> None:
  """Temp memory against depth, both modes, with quadratic fits."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  d = np.array([r["depth"] for r in sweep], float)
  fine = np.linspace(0, d.max() * 1.02, 200)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  for key, label, color in (("default_mib", "default", "C3"),
                            ("efficient_mib", "memory_efficient", "C0")):
    y = np.array([r[key] for r in sweep], float) / 1024
    ax.plot(d, y, "o", color=color, label=label)
    ax.plot(fine, np.polyval(np.polyfit(d, y, 2), fine), "-", color=color, alpha=0.4, lw=1)
  ax.set_ylim(bottom=0)
  ax.set_xlabel("depth L (DenseNet-BC, k=12, 32x32)")
  ax.set_ylabel(f"XLA temp memory of a training step (GiB), batch {sweep[0]['batch']}")
  ax.set_title("Training-step memory vs depth (lines: quadratic fits)", fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Measures the named models and the depth sweep; prints a JSON line per row and the fit."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(f"{m}:{b}" for m, b in NAMED),
                 help="named rows as name:batch,... ('' for none)")
  p.add_argument("--depths", default=",".join(map(str, SWEEP_DEPTHS)),
                 help="sweep depths ('' for none)")
  p.add_argument("--sweep-batch", type=int, default=64)
  p.add_argument("--plot", default=None, help="write the depth plot (PNG) here")
  args = p.parse_args(argv)
  _common.fast_cpu_init()
  rows = [measure(m.split(":")[0], int(m.split(":")[1]))
          for m in args.models.split(",") if m]
  for r in rows:
    _common.emit(r)
  sweep = []
  for depth in (int(d) for d in args.depths.split(",") if d):
    sweep.append(measure(f"densenet_bc_L{depth}_k12", args.sweep_batch, depth))
    _common.emit(sweep[-1])
  if len(sweep) >= 3:
    rows.append(fit(sweep))
    _common.emit(rows[-1])
    if args.plot:
      plot(sweep, args.plot)
  return rows + sweep


if __name__ == "__main__":
  main()
