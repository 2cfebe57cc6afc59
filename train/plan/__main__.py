"""`python -m train.plan`: the command line (train/plan/__init__.py says what it does)."""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

import train.plan as plan_lib
from train import cli, errors

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program: train.main has --config too)."""
  config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2",
                      "A TPU slice, GENERATION:SHAPE, e.g. v5e:2x2, v5e:16x16, v6e:4x4, "
                      "v4:2x2x1, v5p:2x2x1, tpu7x:2x2x1; or GPUs, GENERATION:GPUS or "
                      ":HOSTSxGPUS, e.g. h100:8, h200:2x8, a100:1.")
  flags.DEFINE_integer("num_slices", 1, "Slices joined by the data-center network (multislice).")
  flags.DEFINE_bool("max_batch", True,
                    "Also search for the largest per-chip batch whose train step fits in HBM "
                    "(a few more train-step compiles, at most --max_batch_compiles); "
                    "--nomax_batch compiles only the configured batch.")
  flags.DEFINE_integer("max_batch_compiles", 5,
                       "The most train-step compiles the largest-batch search may spend.",
                       lower_bound=1)
  flags.DEFINE_bool("json", False, "Print one JSON object as the last line of the output.")
  flags.DEFINE_string("dump_hlo", None, "A folder for the optimised HLO text of both steps.")


def main(argv: list[str]) -> None:
  """Plans the configured run on --topology and prints the report (and JSON)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.require_config(FLAGS.config)
  try:
    result = plan_lib.plan(FLAGS.config, FLAGS.topology, FLAGS.num_slices, FLAGS.max_batch,
                  progress=lambda text: print(text, flush=True),
                  max_batch_compiles=FLAGS.max_batch_compiles, hlo_dir=FLAGS.dump_hlo)
  except errors.UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(plan_lib.report(result))
  if FLAGS.json:
    print(json.dumps(result.asdict()))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, plan_lib.__doc__))
