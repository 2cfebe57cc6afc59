"""The speed choices that differ per backend, in one table that the model and the trainer read.

Every choice computes the same function (tests/reference_test.py holds each combination equal
to a textbook DenseNet); they differ only in what each compiler makes fast. They were measured
on XLA:CPU with timed steps and on TPU with the compiler's own per-chip HBM bytes and memory
from ahead-of-time compiles (`python -m train.plan`); docs/performance.md has the figures.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax


@dataclasses.dataclass(frozen=True)
class FastPath:
  """How the model and the step are built for one backend.

  Attributes:
    matmul_1x1: run 1x1 convolutions as matmuls (`DenseNet.matmul_1x1`). XLA:CPU lowers a 1x1
      convolution's weight gradient as a whole-image-window convolution, several times
      slower than the same contraction as a GEMM.
    layer_barrier: an `optimization_barrier` before every dense layer (`DenseNet.layer_barrier`).
      On XLA:CPU it keeps each map's gradient accumulating layer by layer (without it, one
      fusion sums it over all later layers and keeps their input gradients alive); on TPU it
      forces every layer's concatenation into HBM and back.
    channel_group: concatenate a block's new maps into groups of this many channels (0: keep
      one array per map; `DenseNet.channel_group`). A TPU pads every array's channel (lane)
      dimension to 128, so narrow maps stored alone move several times their size.
    compiler_options: XLA options for the train step's `jax.jit`.
  """

  matmul_1x1: bool
  layer_barrier: bool
  channel_group: int = 0
  compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)


FAST_PATHS = {
    # oneDNN (torch's CPU kernels) runs convolutions and matmuls; YNNPACK keeps only the
    # reductions, its narrow-channel convolutions being the slower ones (1.12-1.16x per step;
    # 1.13x over XLA:CPU defaults). XLA:CPU cannot serialize oneDNN calls: no compilation cache.
    "cpu": FastPath(matmul_1x1=True, layer_barrier=True, compiler_options={
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_custom_call": True,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}),
    # Grouping maps into 128-channel arrays saves 5% of the HBM bytes of DenseNet-BC-100 (k=12)
    # but costs 2% of the bytes and 7% of the memory of a DenseNet-121-shaped net (k=32).
    "tpu": FastPath(matmul_1x1=False, layer_barrier=False, channel_group=0),
    "gpu": FastPath(matmul_1x1=False, layer_barrier=False),
}


def platform_kind(platform: str) -> str:
  """'cpu', 'tpu' or 'gpu' for a JAX platform name ('cuda' and 'rocm' are GPUs)."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def fast_path(platform: str | None = None) -> FastPath:
  """The choices for `platform` (default: JAX's default backend); unknown ones get the GPU's."""
  return FAST_PATHS.get(platform_kind(platform or jax.default_backend()), FAST_PATHS["gpu"])
