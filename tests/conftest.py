"""Shared pytest setup."""

import importlib.util

import jax
import pytest

# XLA:CPU compiles the partitionable threefry kernels ~10x slower (BC-100 init: 112 s vs 12 s
# on 2 cores); the tests need fast compiles, not a particular random stream.
jax.config.update("jax_threefry_partitionable", False)

# torch (optional, for the parity tests) segfaults loading triton once TensorFlow is loaded;
# loaded first, both work.
if importlib.util.find_spec("torch") is not None:
  import torch._dynamo  # noqa: F401


@pytest.fixture
def mock_cifar(monkeypatch):
  """tfds.testing.mock_data CIFAR-10 (40 random examples per split), 'downloadable'."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from train import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(input_pipeline, "_can_reach", lambda url: True)  # mock "downloads"
  with tfds.testing.mock_data(num_examples=40):
    yield
