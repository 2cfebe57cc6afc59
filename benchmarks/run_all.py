"""One command for every benchmark number: runs the stages, then regenerates RESULTS.md.

Each measurement runs in its own subprocess (XLA flags are per-process),
appends its JSON row to benchmarks/results/<stage>.jsonl, and RESULTS.md is rendered from the
newest row of every configuration in those files (with the date and load average it was
measured at). A stage that is not rerun keeps its previous rows, so

    python benchmarks/run_all.py                 # default stages (~15 min on 2 quiet cores)
    python benchmarks/run_all.py --full          # + torch.compile, XLA flags
    python benchmarks/run_all.py --stages roof,train_step   # refresh some stages
    python benchmarks/run_all.py --render-only   # rewrite RESULTS.md from the saved rows

Stages: roof, train_step, memory, input_pipeline, peers_torch, peers_keras (default);
torch_compile, xla_flags (--full). --wait-quiet N waits (up to N s) for the
1-minute load average to drop below --quiet-load before each timing measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")
PY = sys.executable

DEFAULT_STAGES = ("roof", "train_step", "memory", "input_pipeline", "peers_torch",
                  "peers_keras")
FULL_STAGES = ("torch_compile", "xla_flags")
STEPS = 10
WARMUP = 1

# (model, batch, dtype, memory_efficient)
TRAIN_STEP_CONFIGS = (
    ("densenet_bc_100", 64, "float32", False),
    ("densenet_bc_100", 64, "float32", True),
    ("densenet_bc_100", 64, "bfloat16", False),
    ("densenet_bc_100", 64, "bfloat16", True),
    ("densenet121", 8, "float32", False),
    ("densenet121", 8, "float32", True),
    ("densenet121", 8, "bfloat16", False),
    ("densenet121", 8, "bfloat16", True),
)
GREEDY = "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"
XLA_FLAG_CONFIGS = (
    # (flags, memory_efficient) on the shipped BC-100, batch 64, float32
    (GREEDY, True),
    (GREEDY, False),
    ("--xla_cpu_use_onednn=true", True),
    ("--xla_cpu_prefer_vector_width=512", True),
)


def _wait_quiet(args) -> None:
  if args.wait_quiet <= 0:
    return
  deadline = time.time() + args.wait_quiet
  while os.getloadavg()[0] > args.quiet_load and time.time() < deadline:
    time.sleep(10)


def _run(cmd: list[str], stage: str, args, timeout: float = 1800, quiet: bool = True
         ) -> list[dict[str, Any]]:
  """Runs one benchmark subprocess; appends (and returns) its JSON rows."""
  if args.only and not all(tok in " ".join(cmd) for tok in args.only.split("&")):
    return []
  if quiet:
    _wait_quiet(args)
  print(f"[{stage}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
  t0 = time.time()
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=_common.REPO)
  except subprocess.TimeoutExpired:
    print(f"[{stage}]   timed out after {timeout:.0f} s", file=sys.stderr, flush=True)
    return [_failure(stage, cmd, f"timeout after {timeout:.0f} s")]
  rows = []
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  if out.returncode or not rows:
    tail = out.stderr.strip().splitlines()[-3:]
    print(f"[{stage}]   failed (rc {out.returncode}): {' | '.join(tail)}", file=sys.stderr)
    rows = [_failure(stage, cmd, " | ".join(tail)[-400:])]
  stamp = _common.machine()["date"]
  short = " ".join(os.path.relpath(c, _common.REPO) if c.endswith(".py") else c for c in cmd[1:])
  with open(os.path.join(RESULTS_DIR, f"{stage}.jsonl"), "a") as f:
    for r in rows:
      r.setdefault("measured", stamp)
      r["stage"] = stage
      r["cmd"] = short
      f.write(json.dumps(r) + "\n")
  print(f"[{stage}]   {len(rows)} row(s) in {time.time() - t0:.0f} s", file=sys.stderr)
  return rows


def _failure(stage: str, cmd: list[str], why: str) -> dict[str, Any]:
  del cmd  # _run records it
  return {"bench": "failed", "stage": stage, "error": why}


def stage_roof(args: argparse.Namespace) -> None:
  """Large-GEMM GFLOP/s of this machine (the roof of the roof_frac columns)."""
  _run([PY, f"{HERE}/roof.py"], "roof", args)


def stage_train_step(args: argparse.Namespace) -> None:
  """The shipped train step for every TRAIN_STEP_CONFIGS row."""
  for model, batch, dtype, eff in TRAIN_STEP_CONFIGS:
    cmd = [PY, f"{HERE}/train_step.py", "--model", model, "--batch", str(batch),
           "--dtype", dtype, "--steps", str(args.steps), "--warmup", str(WARMUP)]
    if eff:
      cmd.append("--memory-efficient")
    _run(cmd, "train_step", args)


def stage_memory(args: argparse.Namespace) -> None:
  """Training-step temp memory (named models and the depth sweep) and its plot."""
  cmd = [PY, f"{HERE}/memory.py", "--plot", f"{HERE}/memory_vs_depth.png"]
  if args.fresh_memory:
    cmd.append("--fresh")
  # memory rows do not depend on load: no waiting for a quiet machine
  open(os.path.join(RESULTS_DIR, "memory.jsonl"), "w").close()
  _run(cmd, "memory", args, timeout=5400, quiet=False)


def stage_input_pipeline(args: argparse.Namespace) -> None:
  """The CIFAR and ImageNet input pipelines alone."""
  _run([PY, f"{HERE}/input_pipeline.py"], "input_pipeline", args)


def _torch_available() -> bool:
  return subprocess.run([PY, "-c", "import torch, torchvision"], capture_output=True).returncode == 0


def stage_peers_torch(args: argparse.Namespace,
                      modes: tuple[str, ...] = ("eager_nchw", "eager_channels_last"),
                      stage: str = "peers_torch") -> None:
  """torchvision-style DenseNets in eager torch (skipped without torch)."""
  if not _torch_available():
    print("[peers_torch] torch/torchvision not importable: skipped", file=sys.stderr)
    return
  for model, batch in (("bc100", 64), ("densenet121", 8)):
    for mode in modes:
      _run([PY, f"{HERE}/peers_torch.py", "--model", model, "--batch", str(batch), "--mode",
            mode, "--steps", str(args.steps), "--warmup", str(WARMUP)], stage, args)


def stage_torch_compile(args: argparse.Namespace) -> None:
  """The BC-100 torch peer under torch.compile (skipped without torch)."""
  # inductor compiles the BC-100 training step in ~5.5 min on 2 cores; DenseNet-121's would
  # take longer than this stage is worth, so only BC-100
  if not _torch_available():
    return
  for mode in ("compile_nchw", "compile_channels_last"):
    _run([PY, f"{HERE}/peers_torch.py", "--model", "bc100", "--batch", "64", "--mode", mode,
          "--steps", str(args.steps), "--warmup", str(WARMUP)], "torch_compile", args,
         timeout=1200)


def stage_peers_keras(args: argparse.Namespace) -> None:
  """Keras 3 DenseNet-121 on the JAX backend."""
  _run([PY, f"{HERE}/peers_keras.py", "--batch", "8", "--steps", str(args.steps),
        "--warmup", str(WARMUP)], "peers_keras", args)


def stage_xla_flags(args: argparse.Namespace) -> None:
  """The shipped BC-100 train step under each XLA_FLAG_CONFIGS flag."""
  for flags, eff in XLA_FLAG_CONFIGS:
    cmd = [PY, f"{HERE}/train_step.py", "--model", "densenet_bc_100", "--batch", "64",
           "--dtype", "float32", "--steps", str(args.steps), "--warmup", str(WARMUP),
           f"--xla-flags={flags}"]
    if eff:
      cmd.append("--memory-efficient")
    _run(cmd, "xla_flags", args)


STAGES: dict[str, Callable] = {
    "roof": stage_roof, "train_step": stage_train_step, "memory": stage_memory,
    "input_pipeline": stage_input_pipeline, "peers_torch": stage_peers_torch,
    "peers_keras": stage_peers_keras, "torch_compile": stage_torch_compile,
    "xla_flags": stage_xla_flags,
}


def main(argv: list[str] | None = None) -> None:
  """Runs the requested stages, then renders RESULTS.md."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stages", default=None, help="comma-separated stages (default: the core)")
  p.add_argument("--full", action="store_true", help="also torch_compile, xla_flags")
  p.add_argument("--render-only", action="store_true")
  p.add_argument("--steps", type=int, default=STEPS, help="timed steps per measurement")
  p.add_argument("--fresh-memory", action="store_true", help="recompile every memory row")
  p.add_argument("--wait-quiet", type=float, default=0.0,
                 help="wait up to this many seconds for a quiet machine before each timing")
  p.add_argument("--quiet-load", type=float, default=1.0)
  p.add_argument("--only", default="",
                 help="run only commands containing all of these &-separated substrings")
  p.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
  args = p.parse_args(argv)
  os.makedirs(RESULTS_DIR, exist_ok=True)
  if not args.render_only:
    stages = (args.stages.split(",") if args.stages else
              list(DEFAULT_STAGES) + (list(FULL_STAGES) if args.full else []))
    t0 = time.time()
    for s in stages:
      STAGES[s](args)
    print(f"all stages: {time.time() - t0:.0f} s", file=sys.stderr)
  import render  # pylint: disable=g-import-not-at-top
  text = render.render(RESULTS_DIR)
  with open(args.output, "w") as f:
    f.write(text)
  print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
  main()
