"""scikit-learn's handwritten digits as a real on-disk tfds dataset (the offline demo)."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from train import errors

NAME = "sklearn_digits"
VERSION = "1.0.0"
NUM_TEST = 360  # the remaining 1437 images train


def builder(data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the digits builder under data_dir, writing the dataset there on first use."""
  data_dir = os.path.expanduser(data_dir or "~/tensorflow_datasets")
  folder = os.path.join(data_dir, NAME, VERSION)
  fix = f"Delete {os.path.join(data_dir, NAME)} and rerun: it is written again from scikit-learn."
  if os.path.exists(os.path.join(folder, "dataset_info.json")):
    try:
      return tfds.builder_from_directory(folder)
    except tfds.core.dataset_info.DatasetInfoFileError as e:
      raise errors.DatasetError(f"{folder}/dataset_info.json cannot be read. {fix}") from e
  if os.path.isdir(folder) and os.listdir(folder):
    raise errors.DatasetError(f"{folder} holds files but no dataset_info.json (an interrupted "
                              f"first run or copy). {fix}")
  print(f"Writing scikit-learn's 1,797 handwritten digits as a tfds dataset to {folder} "
        f"(first run only; no download).", flush=True)
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
  # tfds narrates this as a download of unknown size; it is a local write of ~1 MB.
  tfds.disable_progress_bar()
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      tfds.dataset_builders.store_as_tfds_dataset(
          name=NAME, version=VERSION, features=features, data_dir=data_dir,
          split_datasets={"train": split(train), "test": split(test)},
          description="scikit-learn load_digits(): 1797 8x8 handwritten digits.")
  finally:
    logging.set_verbosity(verbosity)
  return tfds.builder_from_directory(folder)
