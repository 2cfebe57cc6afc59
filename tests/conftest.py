"""Shared pytest setup."""

import jax

# XLA:CPU compiles the partitionable threefry kernels ~10x slower (BC-100 init: 112 s vs 12 s
# on 2 cores); the tests need fast compiles, not a particular random stream.
jax.config.update("jax_threefry_partitionable", False)
