"""Shared helpers of the benchmark scripts: load average, machine facts, JSON and markdown rows.

Every measurement carries `os.getloadavg()` taken right before and after it: on a shared 2-core
machine a 1-minute load average above ~1 means another process took CPU time from the run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from typing import Any, Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # `configs` lives at the repo root; scripts run as files or modules
  sys.path.insert(0, REPO)


def loadavg() -> list[float]:
  """The 1-, 5- and 15-minute load averages, rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or platform.processor())."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
  """The CPU feature flags (empty off Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  flags = cpu_flags()
  isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
         if f in flags]
  try:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem_gib = float("nan")
  return {
      "cpu": cpu_model(),
      "cores": os.cpu_count(),
      "isa": isa,
      "memory_gib": round(mem_gib, 1),
      "python": platform.python_version(),
      "platform": platform.platform(),
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }


def versions(names: Iterable[str] = ("jax", "jaxlib", "flax", "optax", "tensorflow",
                                     "tensorflow_datasets", "keras", "torch", "torchvision",
                                     "numpy")) -> dict[str, str]:
  """Installed versions of the packages that matter here (absent ones left out)."""
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  dist = {"tensorflow": ("tensorflow-cpu", "tensorflow"),
          "tensorflow_datasets": ("tensorflow-datasets",)}
  out = {}
  for name in names:
    for d in dist.get(name, (name,)):
      try:
        out[name] = metadata.version(d)
        break
      except metadata.PackageNotFoundError:
        continue
  return out


def git_commit() -> str:
  """The repo's HEAD commit (short), or '' outside git."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ""


def summarize_times(seconds: Sequence[float]) -> dict[str, float]:
  """Median, min and mean of per-step wall times (seconds)."""
  return {
      "median_s": statistics.median(seconds),
      "min_s": min(seconds),
      "mean_s": statistics.fmean(seconds),
      "stdev_s": statistics.pstdev(seconds) if len(seconds) > 1 else 0.0,
  }


def emit(row: dict[str, Any]) -> None:
  """Prints one JSON line (the machine-readable result)."""
  print(json.dumps(row, sort_keys=False), flush=True)


def append_markdown(path: str | None, columns: Sequence[str], row: dict[str, Any]) -> None:
  """Appends `row` to a markdown table at `path`, writing the header for a new file."""
  if not path:
    return
  new = not os.path.exists(path) or os.path.getsize(path) == 0
  with open(path, "a") as f:
    if new:
      f.write("| " + " | ".join(columns) + " |\n")
      f.write("|" + "---|" * len(columns) + "\n")
    f.write("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |\n")


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    if abs(v) >= 100:
      return f"{v:,.0f}"
    if abs(v) >= 10:
      return f"{v:.1f}"
    return f"{v:.3g}"
  if isinstance(v, (list, tuple)):
    return " ".join(_fmt(x) for x in v)
  return str(v)
