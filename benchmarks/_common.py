"""What every benchmark script shares: the load average, the machine, timing stats, JSON rows.

Every measurement carries `os.getloadavg()` from right before and after it: on a shared 2-core
machine a 1-minute load average above ~1 means another process took CPU time from the run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from importlib import metadata
from typing import Any, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `train` lives at the repo root; the scripts run as files
  sys.path.insert(0, REPO)

PACKAGES = ("jax", "jaxlib", "flax", "optax", "tensorflow-cpu", "tensorflow-datasets", "keras",
            "torch", "torchvision", "numpy")


def loadavg() -> list[float]:
  """The 1-, 5- and 15-minute load averages, rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def now() -> str:
  """The local time, ISO 8601 to the second."""
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def machine() -> dict[str, Any]:
  """What the numbers were measured on: CPU, cores, memory, installed versions."""
  cpu, flags = platform.processor() or "unknown", set()
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
          cpu = value.strip()
        elif key.strip() == "flags":
          flags = set(value.split())
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return {
      "cpu": cpu, "cores": os.cpu_count(),
      "isa": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
      "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
      "platform": platform.platform(), "versions": versions,
  }


def fast_cpu_init() -> None:
  """Non-partitionable threefry: XLA:CPU compiles the initialiser ~10x faster (same shapes)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_threefry_partitionable", False)


def timing(seconds: Sequence[float], batch: int) -> dict[str, float]:
  """Median and best step time (ms) and the images/s they give."""
  median, best = statistics.median(seconds), min(seconds)
  return {"step_ms": round(1e3 * median, 2), "step_ms_min": round(1e3 * best, 2),
          "img_per_s": round(batch / median, 2), "img_per_s_best": round(batch / best, 2)}


def emit(row: dict[str, Any]) -> None:
  """Prints one JSON line (the machine-readable result)."""
  print(json.dumps(row), flush=True)


def fmt(v: Any) -> str:
  """A table cell: 3 significant digits, thousands separators, lists space-separated."""
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
  if isinstance(v, (list, tuple)):
    return " ".join(fmt(x) for x in v)
  return str(v)


def append_markdown(path: str | None, columns: Sequence[str], row: dict[str, Any]) -> None:
  """Appends `row` to a markdown table at `path`, writing the header for a new file."""
  if not path:
    return
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a") as f:
    if new:
      f.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    f.write("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |\n")
