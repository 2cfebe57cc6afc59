"""The train step on a TPU or GPU that is not here: the planner's figures for one model variant.

Compiles, ahead of time for a TPU or GPU topology (`train.plan`: libtpu, or JAX's CUDA plugin),
the trainer's train and eval steps for a config with one of these models and prints one JSON row:

  shipped        the model as the trainer builds it for the topology (densenet_jax.backends)
  concatenating  the same with concatenating dense blocks (`block_buffer=False`)
  cpu_choices    the same preset with the CPU fast path (per-layer barrier, 1x1 as matmul)
  textbook       the textbook DenseNet the equivalence tests hold the library to
                 (tests/reference_densenet.py: concatenate, nn.BatchNorm, nn.Conv)
  resnet50       a plain flax ResNet-50 (benchmarks/resnet50.py) in the same step: the
                 reference DenseNet-121's bytes per image are held against

    python benchmarks/accelerator_plan.py --config imagenet_densenet121 --topology v5e:2x2
    python benchmarks/accelerator_plan.py --config cifar_bc --variant textbook --dump-hlo /tmp/h
    python benchmarks/accelerator_plan.py --topology v4:2x2x1 --per-chip-batch 256 --variant resnet50

Every figure is a compiler estimate (memory, flops, HBM bytes accessed), exact for the compiled
program and independent of this machine's load (on GPUs flops and bytes are counted in the
optimised HLO: see train/plan/cost.py); compile seconds are this machine's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
from train import plan as plan_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from train import step as step_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = ("shipped", "concatenating", "cpu_choices", "textbook", "resnet50")


def build_model(config, variant: str, platform: str = "tpu"):
  """The variant's model for `config`'s dataset on `platform` ("tpu" or "cuda"), or None for the
  trainer's own (shipped)."""
  _, classes, channels = plan_lib.DATASETS[config.dataset]
  if variant == "shipped":
    return None
  if variant == "resnet50":
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from resnet50 import ResNet50  # pylint: disable=g-import-not-at-top
    return ResNet50(classes, jnp.bfloat16 if config.half_precision else jnp.float32)
  if variant in ("cpu_choices", "concatenating"):
    model = step_lib.create_model(config, classes, channels,
                                  platform="cpu" if variant == "cpu_choices" else platform)
    return model.clone(block_buffer=False)
  from reference_densenet import ReferenceDenseNet  # pylint: disable=g-import-not-at-top
  return ReferenceDenseNet(step_lib.create_model(config, classes, channels, platform=platform))


def main(argv: list[str] | None = None) -> dict:
  """Plans one variant and prints its JSON row."""
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="imagenet_densenet121", help="a module of configs/")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--variant", choices=VARIANTS, default="shipped")
  p.add_argument("--memory-efficient", action="store_true")
  p.add_argument("--per-chip-batch", type=int, default=None,
                 help="images per chip (default: the config's batch over the chips)")
  p.add_argument("--dump-hlo", default=None, help="folder for the optimised HLO of both steps")
  args = p.parse_args(argv)
  config = importlib.import_module(f"configs.{args.config}").get_config()
  config.memory_efficient = args.memory_efficient
  chip = plan_lib.check_topology(args.topology)
  if args.per_chip_batch:
    chips = len(plan_lib.accelerator_devices(args.topology)[1]) // chip.devices_per_chip
    config.batch_size = args.per_chip_batch * chips
  start = time.time()
  row = plan_lib.plan(config, args.topology, max_batch=False,
                      model=build_model(config, args.variant, chip.platform),
                      hlo_dir=args.dump_hlo).asdict()
  row.update(bench="accelerator_plan", config=args.config, variant=args.variant,
             wall_s=time.time() - start)
  if args.variant == "resnet50":
    row["model"] = "resnet50"  # the plan names the config's model
  print(json.dumps(row), flush=True)
  return row


if __name__ == "__main__":
  main()
