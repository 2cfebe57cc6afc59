"""scikit-learn's handwritten digits as a real on-disk tfds dataset (the offline demo)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NAME = "sklearn_digits"
VERSION = "1.0.0"
NUM_TEST = 360  # the remaining 1437 images train


def builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the digits builder under data_dir, writing the dataset there on first use."""
  data_dir = os.path.expanduser(data_dir or "~/tensorflow_datasets")
  try:
    return tfds.builder_from_directory(os.path.join(data_dir, NAME, VERSION))
  except (FileNotFoundError, tfds.core.registered.DatasetNotFoundError, OSError):
    pass
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  # 0..16 intensities to uint8 pixels, one channel.
  images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  order = np.random.default_rng(0).permutation(len(labels))
  test, train = order[:NUM_TEST], order[NUM_TEST:]
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(8, 8, 1)),
      "label": tfds.features.ClassLabel(num_classes=10),
  })
  split = lambda idx: tf.data.Dataset.from_tensor_slices(
      {"image": images[idx], "label": labels[idx]})
  return tfds.dataset_builders.store_as_tfds_dataset(
      name=NAME, version=VERSION, features=features, data_dir=data_dir,
      split_datasets={"train": split(train), "test": split(test)},
      description="scikit-learn load_digits(): 1797 8x8 handwritten digits.")
