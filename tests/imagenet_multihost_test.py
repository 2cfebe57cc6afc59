"""The ImageNet-shaped path on 2 processes x 4 CPU devices: JPEGs, imagenet augmentation, eval."""

import json
import pathlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from multihost_launch import launch, trainer, wait_all

pytestmark = pytest.mark.slow

# configs/imagenet_densenet121.py with a 4-block DenseNet small enough to compile in seconds
# (its model_overrides has no such keys to set from flags).
TINY_CONFIG = """
from configs import imagenet_densenet121


def get_config():
  c = imagenet_densenet121.get_config()
  c.model_overrides = {"growth_rate": 4, "block_config": (1, 1, 1, 1),
                       "num_init_features": 8, "drop_rate": 0.0}
  return c
"""


def write_jpeg_dataset(data_dir: pathlib.Path) -> None:
  """10 classes, 64 train and 40 validation JPEGs of 40-80 px a side."""
  rng = np.random.default_rng(0)

  def split(n):
    sizes = rng.integers(40, 81, (n, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    labels = rng.integers(0, 10, n).astype(np.int64)
    return tf.data.Dataset.from_generator(
        lambda: ({"image": i, "label": l} for i, l in zip(images, labels)),
        output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                          "label": tf.TensorSpec((), tf.int64)})
  tfds.dataset_builders.store_as_tfds_dataset(
      name="tiny_imagenet_jpeg", version="1.0.0", data_dir=str(data_dir),
      features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=10)}),
      split_datasets={"train": split(64), "validation": split(40)})


def test_imagenet_path_on_two_processes_of_four_devices(tmp_path):
  write_jpeg_dataset(tmp_path / "tfds")
  (tmp_path / "tiny_imagenet.py").write_text(TINY_CONFIG)
  workdir = tmp_path / "run"
  args = ["--config", str(tmp_path / "tiny_imagenet.py"),
          "--config.dataset=tiny_imagenet_jpeg", f"--config.data_dir={tmp_path / 'tfds'}",
          "--config.download=False", "--config.image_size=32", "--config.batch_size=16",
          "--config.eval_batch_size=16", "--config.num_train_steps=3",
          "--config.log_every_steps=1", "--config.shuffle_buffer=64", f"--workdir={workdir}"]
  procs = launch(trainer(args), 2, 4, tmp_path, "process")
  codes = wait_all(procs, 600)
  assert codes == [0, 0], "\n".join(
      (tmp_path / f"process{i}.log").read_text()[-3000:] for i in range(2))

  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [l for l in lines if l["kind"] == "train"]
  evals = [l for l in lines if l["kind"] == "eval"]
  assert [l["step"] for l in train] == [1, 2, 3]
  assert all(np.isfinite(l["loss"]) for l in train)
  assert evals and evals[-1]["step"] == 3
  # 40 images over 2 processes, 20 each in local batches of 8 (3 batches, 4 padding rows).
  assert evals[-1]["examples"] == 40
  assert np.isfinite(evals[-1]["loss"]) and 0.0 <= evals[-1]["accuracy"] <= 1.0
