"""Shared pytest setup."""

import importlib.util

import jax

# XLA:CPU compiles the partitionable threefry kernels ~10x slower (BC-100 init: 112 s vs 12 s
# on 2 cores); the tests need fast compiles, not a particular random stream.
jax.config.update("jax_threefry_partitionable", False)

# torch (optional, for the parity tests) segfaults loading triton once TensorFlow is loaded;
# loaded first, both work.
if importlib.util.find_spec("torch") is not None:
  import torch._dynamo  # noqa: F401
