"""One command for every benchmark number: runs the stages, then renders RESULTS.md.

Each measurement runs in its own subprocess and appends its JSON rows to
benchmarks/results/<stage>.jsonl; RESULTS.md shows the newest row of every configuration, with
the time and load average it was measured at. A stage that is not rerun keeps its rows.

    python benchmarks/run_all.py                        # timings (~30 min on 2 quiet cores)
    python benchmarks/run_all.py --full                 # + memory, torch.compile, TPU plans
    python benchmarks/run_all.py --stages accelerator   # TPU plans only (~1 h, needs libtpu)
    python benchmarks/run_all.py --stages train_step    # refresh some stages
    python benchmarks/run_all.py --render-only          # rewrite RESULTS.md from the rows

Stages: train_step, input_pipeline, peers_torch, peers_keras; memory and accelerator (compiles
only, not affected by load) with --full or --stages. --wait-quiet N waits up to N s for the 1-minute
load to drop below 1 before each timing. --torch-python runs the torch peers with another
interpreter (torch may be installable only for another Python version than the project's venv).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position
import render  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
WARMUP = "1"

TRAIN_STEPS = [(model, batch, dtype, efficient)
               for model, batch in (("densenet_bc_100", 64), ("densenet121", 8))
               for dtype in ("float32", "bfloat16") for efficient in (False, True)]
TORCH_PEERS = [(model, batch, mode) for model, batch in (("bc100", 64), ("densenet121", 8))
               for mode in ("eager_nchw", "eager_channels_last")]
# inductor compiles the BC-100 step for ~5 min on 2 cores; DenseNet-121 would take longer
TORCH_COMPILE = [("bc100", 64, "compile_nchw"), ("bc100", 64, "compile_channels_last")]


# The shipped configs on TPU: ours as built for a TPU, with the CPU choices, and the textbook
# model (the compiles take ~2-7 CPU-minutes each; not part of the default timings).
ACCELERATOR = ([(c, t, v, False) for c in ("imagenet_densenet121", "cifar_bc")
                for t in ("v5e:2x2", "v6e:2x2") for v in ("shipped", "concatenating", "textbook")] +
               [(c, "v5e:2x2", "cpu_choices", False) for c in ("imagenet_densenet121", "cifar_bc")] +
               [(c, "v5e:2x2", "shipped", True) for c in ("imagenet_densenet121", "cifar_bc")])


def commands(stage: str, steps: str, full: bool) -> list[list[str]]:
  """The subprocess command lines of one stage."""
  timed = ["--steps", steps, "--warmup", WARMUP]
  if stage == "train_step":
    return [["train_step.py", "--model", m, "--batch", str(b), "--dtype", d, *timed,
             *(["--memory-efficient"] if e else [])] for m, b, d, e in TRAIN_STEPS]
  if stage == "memory":
    return [["memory.py", "--plot", os.path.join(HERE, "memory_vs_depth.png")]]
  if stage == "input_pipeline":
    return [["input_pipeline.py"]]
  if stage == "peers_torch":
    return [["peers_torch.py", "--model", m, "--batch", str(b), "--mode", mode, *timed]
            for m, b, mode in TORCH_PEERS + (TORCH_COMPILE if full else [])]
  if stage == "peers_keras":
    return [["peers_keras.py", "--batch", "8", *timed]]
  if stage == "accelerator":
    return [["accelerator_plan.py", "--config", c, "--topology", t, "--variant", v,
             *(["--memory-efficient"] if e else [])] for c, t, v, e in ACCELERATOR]
  raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(render.STAGES)}")


def run(stage: str, cmd: list[str], wait_quiet: float, python: str = sys.executable) -> None:
  """Runs one measurement with `python` and appends its rows (or a failure row) to the stage's file."""
  deadline = time.time() + wait_quiet
  while stage != "memory" and os.getloadavg()[0] > 1.0 and time.time() < deadline:
    time.sleep(10)
  print(f"[{stage}] {' '.join(cmd)}", file=sys.stderr, flush=True)
  out = subprocess.run([python, os.path.join(HERE, cmd[0]), *cmd[1:]],
                       capture_output=True, text=True, cwd=_common.REPO)
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not rows:
    rows = [{"bench": "failed", "error": out.stderr.strip()[-400:]}]
    print(f"[{stage}]   failed: {rows[0]['error']}", file=sys.stderr)
  with open(os.path.join(RESULTS, f"{stage}.jsonl"), "a") as f:
    for r in rows:
      f.write(json.dumps({**r, "measured": _common.now(), "cmd": " ".join(cmd)}) + "\n")


def main(argv: list[str] | None = None) -> None:
  """Runs the requested stages, then renders RESULTS.md."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--stages", default=None, help="comma-separated (default: the timings)")
  p.add_argument("--full", action="store_true", help="also memory and torch.compile peers")
  p.add_argument("--render-only", action="store_true")
  p.add_argument("--steps", default="10", help="timed steps per measurement")
  p.add_argument("--wait-quiet", type=float, default=0.0)
  p.add_argument("--output", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--torch-python", default=sys.executable,
                 help="interpreter for the peers_torch stage (default: this one)")
  args = p.parse_args(argv)
  if not args.render_only:
    timings = [s for s in render.STAGES if s not in ("memory", "accelerator")]
    stages = (args.stages.split(",") if args.stages
              else timings + ["memory", "accelerator"] * args.full)
    for stage in stages:
      if stage == "memory":  # a full run replaces the rows (they do not depend on load)
        open(os.path.join(RESULTS, "memory.jsonl"), "w").close()
      for cmd in commands(stage, args.steps, args.full):
        run(stage, cmd, args.wait_quiet,
            args.torch_python if stage == "peers_torch" else sys.executable)
  with open(args.output, "w") as f:
    f.write(render.render(RESULTS))
  print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
  main()
