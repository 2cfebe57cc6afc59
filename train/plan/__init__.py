"""Plans a run on TPUs or GPUs that are not here: does it fit, how fast, how long to compile.

    python -m train.plan --config configs/imagenet_densenet121.py --topology v5e:16x16
    python -m train.plan --config configs/cifar_bc.py --topology v6e:2x2 --json
    python -m train.plan --config configs/cifar_bc.py --topology h100:8

Compiles, ahead of time on this machine's CPU, exactly the train and eval steps `train.main`
would run on that topology (same model, optimizer, dtype, sharding, donation and batch per
chip; `--config.FIELD=VALUE` overrides work as in train.main) and reports, per chip, what the
compiler says: memory (arguments, temporaries, peak against the chip's HBM), flops and HBM
bytes accessed per step, and from those a roofline step time against the chip's published peak.
Every figure is a compiler estimate, not a measurement on hardware. No data and no workdir:
dataset sizes come from a table of the shipped datasets. TPUs need libtpu
(`pip install -e '.[tpu]'`); NVIDIA GPUs (H100, H200, A100) need JAX's CUDA plugin and CUDA's
ptxas, nothing that needs a GPU or a driver (`pip install 'jax-cuda12-plugin==JAX_VERSION'
nvidia-cuda-nvcc-cu12`, about 240 MB). Without a GPU, XLA:GPU has no cost analysis: a GPU
plan's flops are its convolutions and dots and its bytes each kernel's operands and results,
counted in the optimised HLO (`work_source` says so).

The roofline is the largest of three lower bounds on a step's time (two on GPUs):
  compute      the compiler's flops at the chip's bf16 peak;
  MXU-width    the flops the matrix units execute: every convolution and dot of the optimised
               HLO with its contraction size (input features x window) and its output-feature
               size each rounded up to the MXU width (128 on v4/v5e/v5p, 256 on v6e/tpu7x), at
               the same peak. A 3x3 convolution that makes 12 channels occupies a 128-wide MXU
               as if it made 128: the peak assumes full tiles. Elementwise work is left out (it
               runs on the vector units), so this bound counts only matrix work;
  memory       the compiler's HBM bytes accessed at the chip's HBM bandwidth.
Sources: the MXU is a 128x128 systolic array (https://cloud.google.com/tpu/docs/
system-architecture-tpu-vm); v6e has 256x256 MXUs (https://cloud.google.com/tpu/docs/v6e);
tpu7x's width is JAX's own table (`mxu_column_size=256` for TPU_7X in jax/_src/tpu_info.py,
JAX 0.12.0.1), as Google's tpu7x page does not state it. docs/accelerators.md has the model's
limits.
"""

import os

# Compiling for a topology needs libtpu but never a TPU: keep JAX itself on the CPU, and let
# several planners (or tests) load libtpu at once.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=g-import-not-at-top,wrong-import-position
from train.plan.chips import (CHIPS, DATASETS, MAX_CHIPS, Chip, GiB, accelerator_devices,
                              check_topology, gpu_devices, gpu_target_config, split_size,
                              tpu_devices)
from train.plan.cost import (BOUNDS, MatmulFlops, OutOfMemory, StepCost, bound_seconds,
                             compile_cost, hlo_bytes_accessed, matmul_flops, roofline_seconds)
from train.plan.planner import Plan, largest_fitting_batch, plan, report

__all__ = ["BOUNDS", "CHIPS", "DATASETS", "MAX_CHIPS", "Chip", "GiB", "MatmulFlops", "OutOfMemory",
           "Plan", "StepCost", "accelerator_devices", "bound_seconds", "check_topology",
           "compile_cost", "gpu_devices", "gpu_target_config", "hlo_bytes_accessed",
           "largest_fitting_batch", "matmul_flops", "plan", "report", "roofline_seconds",
           "split_size", "tpu_devices"]
