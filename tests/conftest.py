"""Shared pytest setup."""

import importlib.util
import os

# Where libtpu (the planner's compiler, the `tpu` extra) is installed and no TPU is attached,
# keep every test process and its children on the CPU, without libtpu's start-up warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # pylint: disable=g-import-not-at-top
import pytest

# XLA:CPU compiles the partitionable threefry kernels ~10x slower (BC-100 init: 112 s vs 12 s
# on 2 cores); the tests need fast compiles, not a particular random stream.
jax.config.update("jax_threefry_partitionable", False)

# torch (optional, for the parity tests) segfaults loading triton once TensorFlow is loaded;
# loaded first, both work.
if importlib.util.find_spec("torch") is not None:
  import torch._dynamo  # noqa: F401


def write_cifar10(data_dir: str, num_examples: int) -> None:
  """A real on-disk 'cifar10' (tfds' own features and version) of random 32x32 images."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  def split(name):
    return tf.data.Dataset.from_tensor_slices({
        "id": [f"{name}_{i}" for i in range(num_examples)],
        "image": rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, num_examples)})
  registered = tfds.builder("cifar10", data_dir=data_dir)
  tfds.dataset_builders.store_as_tfds_dataset(
      name="cifar10", version=str(registered.version), data_dir=data_dir,
      features=registered.info.features,
      split_datasets={"train": split("train"), "test": split("test")})


@pytest.fixture(scope="session")
def _cifar10_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("cifar10")
  write_cifar10(str(data_dir), 40)
  return data_dir


@pytest.fixture
def tiny_cifar10(tmp_path, _cifar10_dir):
  """A prepared CIFAR-10 of 40 random examples per split at tmp_path / 'tfds'."""
  (tmp_path / "tfds").symlink_to(_cifar10_dir, target_is_directory=True)
  return tmp_path / "tfds"


@pytest.fixture
def tmpfs(tmp_path):
  """mount(name, size): a tmpfs of `size` at tmp_path / name, unmounted after the test.

  Needs root; the test is skipped where mounting is refused.
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  mounts = []

  def mount(name: str, size: str):
    path = tmp_path / name
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode:
      pytest.skip("cannot mount a tmpfs here (needs root)")
    mounts.append(path)
    return path

  yield mount
  for path in reversed(mounts):
    subprocess.run(["umount", "-l", str(path)], check=False)
