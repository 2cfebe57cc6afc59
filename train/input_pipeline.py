"""tf.data input pipelines through tfds: per-process shards, deterministic order, exact eval.

The order of training batches is a pure function of (seed, epoch, step), so a resumed run sees
exactly the batches an uninterrupted one would. Augmentation draws from stateless RNGs seeded by
the same triple.
"""

from __future__ import annotations

import dataclasses
import socket
import urllib.parse
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from train import digits

# TF must stay off accelerators (JAX owns them) and leave CPU cores to XLA.
tf.config.set_visible_devices([], "GPU")


class DataMissingError(RuntimeError):
  """The dataset is not prepared and cannot be downloaded; the message says how to stage it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""

  num_classes: int
  num_train: int
  num_eval: int
  channels: int
  image_size: tuple[int | None, int | None]  # (None, None) for variable-size images


def _can_reach(url: str, timeout: float = 3.0) -> bool:
  host = urllib.parse.urlparse(url).hostname
  if not host:
    return False
  try:
    with socket.create_connection((host, 443), timeout=timeout):
      return True
  except OSError:
    return False


def _staging_help(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> str:
  name = builder.info.name
  data_dir = builder.data_dir_root
  manual = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  lines = [
      f"Dataset '{name}' is not prepared under data_dir={data_dir} and cannot be downloaded "
      f"here (download={config.download}, no network or manual files).",
      "Stage it in one of these ways, then rerun:",
      f"  1. On a machine with internet: python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\" and copy "
      f"{data_dir}/{name} here (or point --config.data_dir at a GCS bucket holding it).",
  ]
  if name.startswith("cifar"):
    archive = "cifar-10-binary.tar.gz" if name == "cifar10" else "cifar-100-binary.tar.gz"
    lines.append(f"  2. Put the original archive {archive} (https://www.cs.toronto.edu/~kriz/"
                 f"cifar.html) into a folder M and pass --config.manual_dir=M.")
  elif manual:
    lines.append(f"  2. Put the manual files into a folder M and pass --config.manual_dir=M: "
                 f"{manual.strip()}")
  else:
    lines.append("  2. Put the files tfds would download into a folder M and pass "
                 "--config.manual_dir=M.")
  return "\n".join(lines)


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """A prepared tfds builder, preparing it from the manual dir or network when possible."""
  if config.dataset == digits.NAME:
    if jax.process_index() == 0:
      digits.builder(config.data_dir)  # written once, by one process
    _sync("digits_dataset")
    return digits.builder(config.data_dir)
  builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = config.manual_dir
  has_manual = bool(manual_dir) and tf.io.gfile.exists(manual_dir) and bool(
      tf.io.gfile.listdir(manual_dir))
  homepage = builder.info.homepage or ""
  # tfds retries an unreachable download for minutes; probe the network first.
  if not has_manual and not (config.download and _can_reach(homepage or "https://www.tensorflow.org")):
    raise DataMissingError(_staging_help(builder, config))
  if has_manual or config.download:
    if jax.process_index() == 0:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    _sync("prepare_dataset")
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  return builder


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def dataset_info(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> DatasetInfo:
  """Number of classes, split sizes and image channels from the builder's metadata."""
  features = builder.info.features
  def size(split: str) -> int:
    try:
      return builder.info.splits[split].num_examples
    except (KeyError, ValueError):  # e.g. tfds.testing.mock_data leaves splits empty
      return int(builder.as_dataset(split=split).reduce(0, lambda n, _: n + 1))
  return DatasetInfo(
      num_classes=features["label"].num_classes,
      num_train=size(config.train_split),
      num_eval=size(config.eval_split),
      channels=features["image"].shape[-1],
      image_size=tuple(features["image"].shape[:2]),
  )


def _normalize(images: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  mean = tf.constant(config.mean, tf.float32)
  std = tf.constant(config.std, tf.float32)
  return (tf.cast(images, tf.float32) - mean) / std


def _augment_cifar_batch(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Zero-pad 4, random crop back, random horizontal flip; vectorised over the batch."""
  shape = tf.shape(images)
  n, h, w = shape[0], shape[1], shape[2]
  padded = tf.pad(images, [[0, 0], [4, 4], [4, 4], [0, 0]])
  seeds = tf.random.experimental.stateless_split(seed, 3)
  dy = tf.random.stateless_uniform([n], seeds[0], 0, 9, tf.int32)
  dx = tf.random.stateless_uniform([n], seeds[1], 0, 9, tf.int32)
  flip = tf.random.stateless_uniform([n], seeds[2]) < 0.5
  rows = dy[:, None] + tf.range(h)[None, :]
  cols = dx[:, None] + tf.range(w)[None, :]
  cols = tf.where(flip[:, None], tf.reverse(cols, axis=[1]), cols)
  crops = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(crops, cols, axis=2, batch_dims=1)


def _random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Inception-style crop (8%-100% area, 3/4-4/3 aspect) resized to size, random flip."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seeds[0],
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize(image, [size, size], method="bicubic")
  return tf.image.stateless_random_flip_left_right(image, seeds[1])


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resize the shorter side to size/0.875 (256 for 224), then crop the centre."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size / 0.875) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bicubic")
  top = (new[0] - size) // 2
  left = (new[1] - size) // 2
  return tf.slice(image, [top, left, 0], [size, size, -1])


def train_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                   local_batch: int, steps_per_epoch: int, start_step: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Local training batches from global step `start_step` on, epoch after epoch."""
  split = tfds.split_for_jax_process(config.train_split, drop_remainder=True)
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    yield from tfds.as_numpy(_train_epoch(builder, config, split, local_batch, epoch, skip))
    epoch, skip = epoch + 1, 0


def _train_epoch(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                 split: str, local_batch: int, epoch: int, skip: int) -> tf.data.Dataset:
  epoch_seed = (config.seed * 100_003 + epoch) % 2**31
  ds = builder.as_dataset(split=split, shuffle_files=True,
                          read_config=tfds.ReadConfig(shuffle_seed=epoch_seed))
  ds = ds.shuffle(config.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
  size = config.image_size
  if config.augment == "imagenet":
    ds = ds.enumerate().map(
        lambda i, ex: {"image": _random_resized_crop(ex["image"], size, tf.stack(
            [tf.constant(epoch_seed, tf.int64), i])), "label": ex["label"]},
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.enumerate().skip(skip)

  def prepare(step: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    images = batch["image"]
    if config.augment == "cifar":
      images = _augment_cifar_batch(images, tf.stack(
          [tf.constant(epoch_seed, tf.int64), step]))
    return {"image": _normalize(images, config), "label": batch["label"]}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(2).with_options(_options())


def eval_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                  channels: int, local_batch: int, num_batches: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_batches` local eval batches; padding rows carry mask 0."""
  split = tfds.split_for_jax_process(config.eval_split, drop_remainder=False)
  ds = builder.as_dataset(split=split, shuffle_files=False)
  size = config.image_size
  if config.augment == "imagenet":
    ds = ds.map(lambda ex: {"image": _center_crop(ex["image"], size), "label": ex["label"]},
                num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda ex: {"image": _normalize(ex["image"], config), "label": ex["label"],
                          "mask": tf.constant(1.0)})
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, channels]),
      "label": tf.constant(0, tf.int64), "mask": tf.constant(0.0)}).repeat()
  ds = ds.concatenate(padding).batch(local_batch).take(num_batches)
  return iter(tfds.as_numpy(ds.prefetch(2).with_options(_options())))


def eval_batches_needed(num_eval: int, local_batch: int) -> int:
  """Batches each process runs so that the largest per-process shard is fully covered."""
  largest_shard = -(-num_eval // jax.process_count())
  return max(1, -(-largest_shard // local_batch))


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.cpu_budget = 1  # leave the other cores to XLA
  options.threading.private_threadpool_size = 2
  return options
