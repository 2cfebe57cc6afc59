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
    layer_barrier: an `optimization_barrier` before every dense layer of a concatenating block
      (`DenseNet.layer_barrier`). On XLA:CPU it keeps each map's gradient accumulating layer by
      layer (without it, one fusion sums it over all later layers and keeps their input
      gradients alive); on TPU it forces every layer's concatenation into HBM and back.
    block_buffer: each dense block's maps in one buffer, read as prefixes, with a custom
      backward pass (`DenseNet.block_buffer`, `densenet_jax.buffer`). A TPU pads every array's
      channel (lane) dimension to 128 and moves what a concatenation copies; the buffer writes
      each map once, packs narrow maps into shared lane tiles and sums gradients in place.
    compiler_options: XLA options for the train step's `jax.jit`.
  """

  matmul_1x1: bool
  layer_barrier: bool
  block_buffer: bool
  compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)

  def model_choices(self) -> dict[str, bool]:
    """The choices that are `DenseNet` attributes, by attribute name."""
    return {"matmul_1x1": self.matmul_1x1, "layer_barrier": self.layer_barrier,
            "block_buffer": self.block_buffer}


FAST_PATHS = {
    # oneDNN (torch's CPU kernels) runs convolutions and matmuls; YNNPACK keeps only the
    # reductions, its narrow-channel convolutions being the slower ones. XLA:CPU cannot
    # serialize oneDNN calls: no compilation cache (docs/performance.md has the measurements).
    "cpu": FastPath(matmul_1x1=True, layer_barrier=True, block_buffer=False, compiler_options={
        "xla_cpu_use_onednn": True,
        "xla_cpu_experimental_onednn_custom_call": True,
        "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}),
    "tpu": FastPath(matmul_1x1=False, layer_barrier=False, block_buffer=True),
    "gpu": FastPath(matmul_1x1=False, layer_barrier=False, block_buffer=False),
}
# JAX platform names (`jax.lax.platform_dependent` keywords) of each kind above; any other
# platform gets the GPU's choices.
PLATFORMS = {"cpu": ("cpu",), "tpu": ("tpu",), "gpu": ("cuda", "rocm")}


def platform_kind(platform: str) -> str:
  """'cpu', 'tpu' or 'gpu' for a JAX platform name ('cuda' and 'rocm' are GPUs)."""
  return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def fast_path(platform: str | None = None) -> FastPath:
  """The choices for `platform` (default: JAX's default backend); unknown ones get the GPU's."""
  return FAST_PATHS.get(platform_kind(platform or jax.default_backend()), FAST_PATHS["gpu"])
