"""Training-step working memory: XLA memory_analysis() temp bytes, default vs memory_efficient.

Uses `densenet_jax.summary.train_step_temp_bytes` (a compiled forward+backward step, abstract
inputs, no data): on XLA:CPU `temp_size_in_bytes` is the step's working memory (activations
kept for the backward pass and scratch); parameters and inputs are not in it.

  named     BC-100 / BC-250 / BC-190 at batch 64 (32x32), DenseNet-121/169/201 at batch 32 (224x224)
  sweep     DenseNet-BC k=12 at L = 40, 64, 100, 136, 172, 208, 250, batch 64: the quadratic
            (default) vs linear (memory_efficient) growth with depth, plotted to --plot

Every compile of a deep net takes tens of seconds on 2 cores, so rows are cached in --cache
(keyed by model, batch, mode and the jax version); --fresh recomputes them.

    python benchmarks/memory.py --set named --set sweep --plot benchmarks/memory_vs_depth.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

NAMED = (("densenet_bc_100", 64), ("densenet_bc_250", 64), ("densenet_bc_190", 64),
         ("densenet121", 32), ("densenet169", 32), ("densenet201", 32))
SWEEP_DEPTHS = (40, 64, 100, 136, 172, 208, 250)
SWEEP_BATCH = 64
COLUMNS = ("model", "depth", "k", "batch", "default_mib", "efficient_mib", "ratio",
           "compile_s", "load")
HERE = os.path.dirname(os.path.abspath(__file__))


def _model_code_hash() -> str:
  """Fingerprint of the model source: a cached row is only reused for the same model code."""
  with open(os.path.join(_common.REPO, "densenet_jax", "models.py"), "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()[:12]


def _key(name: str, batch: int, efficient: bool, jax_version: str) -> str:
  """Cache key of one row: model, batch, mode, jax version and the model code's fingerprint."""
  return (f"{name}|{batch}|{'efficient' if efficient else 'default'}|jax{jax_version}"
          f"|models.py:{_model_code_hash()}")


def _load_cache(path: str | None) -> dict[str, dict[str, Any]]:
  cache = {}
  if path and os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line:
          row = json.loads(line)
          cache[row["key"]] = row
  return cache


def measure_one(name: str, batch: int, efficient: bool, model=None) -> dict[str, Any]:
  """Temp bytes of one model's training step, with the compile time and load average."""
  import jax  # pylint: disable=g-import-not-at-top
  from densenet_jax import models, summary  # pylint: disable=g-import-not-at-top
  if model is None:
    model = models.get_model(name)
  model = model.clone(memory_efficient=efficient)
  shape = models.native_input_shape(model, batch)
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  temp = summary.train_step_temp_bytes(model, shape)
  return {
      "bench": "memory", "key": _key(name, batch, efficient, jax.__version__),
      "model": name, "depth": model.depth, "k": model.growth_rate, "batch": batch,
      "input": shape[1], "memory_efficient": efficient, "temp_bytes": temp,
      "temp_mib": round(temp / 2**20, 1), "compile_s": round(time.perf_counter() - t0, 1),
      "date": _common.machine()["date"], "load_before": load_before, "load_after": _common.loadavg(),
  }


def sweep_model(depth: int, growth: int = 12):
  """The DenseNet-BC of the depth sweep (CIFAR stem, 10 classes)."""
  from densenet_jax import models  # pylint: disable=g-import-not-at-top
  return models.densenet_cifar(depth=depth, growth_rate=growth)


def run(sets: list[str], cache_path: str | None, fresh: bool,
        named: tuple = NAMED, depths: tuple = SWEEP_DEPTHS, sweep_batch: int = SWEEP_BATCH,
        growth: int = 12, modes: tuple = (False, True)) -> list[dict[str, Any]]:
  """Measures (or reads from the cache) every row of the requested sets."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", False)
  cache = {} if fresh else _load_cache(cache_path)
  jobs = []
  if "named" in sets:
    jobs += [(name, batch, None) for name, batch in named]
  if "sweep" in sets:
    # L=100, k=12 is the densenet_bc_100 preset: share its cache entry
    jobs += [("densenet_bc_100" if (d, growth) == (100, 12) else f"densenet_bc_L{d}_k{growth}",
              sweep_batch, d) for d in depths]
  rows = []
  for name, batch, depth in jobs:
    for efficient in modes:
      key = _key(name, batch, efficient, jax.__version__)
      if key in cache:
        row = dict(cache[key], cached=True)
      else:
        model = sweep_model(depth, growth) if depth else None
        row = measure_one(name, batch, efficient, model)
        cache[key] = row
        if cache_path:
          with open(cache_path, "a") as f:
            f.write(json.dumps(row) + "\n")
      row["set"] = "sweep" if depth else "named"
      rows.append(row)
      _common.emit(row)
  return rows


def pair_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per model: default and memory_efficient MiB side by side."""
  out: dict[tuple, dict[str, Any]] = {}
  for r in rows:
    k = (r["set"], r["model"], r["batch"])
    p = out.setdefault(k, {"set": r["set"], "model": r["model"], "depth": r["depth"],
                           "k": r["k"], "batch": r["batch"], "compile_s": 0.0, "load": []})
    p["efficient_mib" if r["memory_efficient"] else "default_mib"] = r["temp_mib"]
    p["compile_s"] += r["compile_s"]
    p["load"].append(r["load_before"][0])
  for p in out.values():
    if "default_mib" in p and "efficient_mib" in p:
      p["ratio"] = round(p["efficient_mib"] / p["default_mib"], 3)
  return list(out.values())


def plot(pairs: list[dict[str, Any]], path: str) -> bool:
  """Temp memory vs depth, both modes, with quadratic/linear fits; False without matplotlib."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
    return False
  sweep = sorted((p for p in pairs if p["set"] == "sweep"), key=lambda p: p["depth"])
  if not sweep:
    return False
  depth = np.array([p["depth"] for p in sweep], float)
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  fine = np.linspace(0, depth.max() * 1.02, 200)
  for key, label, color in (("default_mib", "default", "C3"),
                            ("efficient_mib", "memory_efficient", "C0")):
    ys = [p.get(key) for p in sweep]
    if any(y is None for y in ys) or len(ys) < 3:
      continue
    y = np.array(ys, float) / 1024
    ax.plot(depth, y, "o", color=color, label=label)
    lin = np.polyfit(depth, y, 1)
    ax.plot(fine, np.polyval(lin, fine), ":", color=color, alpha=0.6, lw=1)
    quad = np.polyfit(depth, y, 2)
    ax.plot(fine, np.polyval(quad, fine), "-", color=color, alpha=0.4, lw=1)
  batch = sweep[0]["batch"]
  ax.set_ylim(bottom=0)
  ax.set_xlabel("depth L (DenseNet-BC, k=12, 32x32)")
  ax.set_ylabel(f"XLA temp memory of a training step (GiB), batch {batch}")
  ax.set_title("Training-step memory vs depth (dotted: linear fit, solid: quadratic fit)",
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return True


def fit_growth(pairs: list[dict[str, Any]]) -> dict[str, Any]:
  """Least-squares fits of the sweep: quadratic coefficient share and linear R^2 per mode."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  sweep = sorted((p for p in pairs if p["set"] == "sweep"), key=lambda p: p["depth"])
  if len(sweep) < 3:
    return {}
  d = np.array([p["depth"] for p in sweep], float)
  out = {}
  for key in ("default_mib", "efficient_mib"):
    if not all(key in p for p in sweep):
      continue
    y = np.array([p[key] for p in sweep], float)
    lin = np.polyfit(d, y, 1)
    resid = y - np.polyval(lin, d)
    r2 = 1 - float(resid @ resid) / float(((y - y.mean()) @ (y - y.mean())))
    quad = np.polyfit(d, y, 2)
    # the share of the deepest net's memory that the L^2 term explains
    share = float(quad[0] * d[-1] ** 2 / y[-1])
    out[key] = {"linear_r2": round(r2, 4), "quadratic_share_at_max_depth": round(share, 3),
                "mib_per_depth_linear": round(float(lin[0]), 2),
                "ratio_deepest_to_shallowest": round(float(y[-1] / y[0]), 2),
                "depth_ratio": round(float(d[-1] / d[0]), 2)}
  return out


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  """Measures the requested rows; prints them, their pairs and fits as JSON lines."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--set", action="append", choices=("named", "sweep"), default=None,
                 help="which rows (repeatable; default both)")
  p.add_argument("--depths", default=None, help="sweep depths, e.g. 40,64,100")
  p.add_argument("--growth", type=int, default=12, help="sweep growth rate")
  p.add_argument("--sweep-batch", type=int, default=SWEEP_BATCH)
  p.add_argument("--models", default=None,
                 help="named rows as name:batch,name:batch (default: the six of the issue)")
  p.add_argument("--cache", default=os.path.join(HERE, "results", "memory_cache.jsonl"),
                 help="JSONL cache of measured rows ('' disables)")
  p.add_argument("--fresh", action="store_true", help="ignore the cache")
  p.add_argument("--efficient-only", action="store_true", help="only memory_efficient rows")
  p.add_argument("--plot", default=None, help="write the depth plot (PNG) here")
  p.add_argument("--markdown", default=None, help="append paired rows to this table")
  args = p.parse_args(argv)
  sets = args.set or ["named", "sweep"]
  named = NAMED
  if args.models:
    named = tuple((m.split(":")[0], int(m.split(":")[1])) for m in args.models.split(","))
  depths = tuple(int(d) for d in args.depths.split(",")) if args.depths else SWEEP_DEPTHS
  if args.cache:
    os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
  rows = run(sets, args.cache or None, args.fresh, named, depths, args.sweep_batch, args.growth,
             (True,) if args.efficient_only else (False, True))
  pairs = pair_rows(rows)
  for pr in pairs:
    _common.emit({"bench": "memory_pair", **pr})
    _common.append_markdown(args.markdown, COLUMNS, pr)
  fits = fit_growth(pairs)
  if fits:
    _common.emit({"bench": "memory_fit", **fits})
  if args.plot and plot(pairs, args.plot):
    _common.emit({"bench": "memory_plot", "path": args.plot})
  return rows


if __name__ == "__main__":
  main()
