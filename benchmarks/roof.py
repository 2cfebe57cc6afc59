"""This machine's practical compute roof: large float32 / bfloat16 matmuls in XLA (and torch).

The roof_frac columns of train_step.py divide achieved training GFLOP/s (6 x forward MACs per
image) by --roof-gflops (190 by default: 2 Zen-4 cores x 2 x 256-bit FMA x ~3 GHz, and what a
4096^2 float32 GEMM reaches here when the machine is quiet).

    python benchmarks/roof.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _time(fn, reps: int) -> float:
  fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(n: int, reps: int, torch_too: bool) -> list[dict[str, Any]]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  rows = []
  for dtype in ("float32", "bfloat16"):
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    load = _common.loadavg()
    s = _time(lambda: f(a).block_until_ready(), reps)
    rows.append({"bench": "roof", "lib": "jax/xla", "dtype": dtype, "n": n,
                 "gflops": round(2 * n**3 / s / 1e9, 1), "load": load})
  if torch_too:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      return rows
    torch.set_num_threads(os.cpu_count() or 2)
    for dtype in (torch.float32, torch.bfloat16):
      a = torch.ones(n, n, dtype=dtype)
      load = _common.loadavg()
      s = _time(lambda: a @ a, reps)
      rows.append({"bench": "roof", "lib": "torch", "dtype": str(dtype).split(".")[-1],
                   "n": n, "gflops": round(2 * n**3 / s / 1e9, 1), "load": load})
  return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  rows = measure(args.n, args.reps, not args.no_torch)
  for r in rows:
    _common.emit(r)
  return rows


if __name__ == "__main__":
  main()
