"""tf.data input pipelines through tfds: per-process shards, deterministic order, exact eval.

The order of training batches is a pure function of (seed, epoch, step), so a resumed run sees
exactly the batches an uninterrupted one would. Augmentation draws from stateless RNGs seeded by
(epoch seed, example index in the epoch) or (epoch seed, batch index), never by where a run
started. Training records are read straight from the TFRecord shards in an order computed up
front (`epoch_windows`), so resuming anywhere in an epoch reads one shuffle window, not the
epoch up to there; images are decoded only when used, JPEGs decoded and cropped in one op.
tf.data runs on `input_threads(config)` threads of the host.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import socket
import urllib.parse
from typing import Iterator

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax import imagenet
from train import data_integrity, digits, distributed, errors

# TF must stay off accelerators (JAX owns them) and leave CPU cores to XLA.
tf.config.set_visible_devices([], "GPU")

# libjpeg's accurate integer IDCT, as Pillow (and so torchvision) decodes: TF's default,
# INTEGER_FAST, differs from Pillow by up to 4 levels; this one by none, at no measured cost.
JPEG_DCT = "INTEGER_ACCURATE"


class DataMissingError(errors.UserError, RuntimeError):
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
    distributed.barrier("digits_dataset")
    return digits.builder(config.data_dir)
  builder = data_integrity.open_builder(config.dataset, config.data_dir)
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
    distributed.barrier("prepare_dataset")
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  return builder


def dataset_info(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict) -> DatasetInfo:
  """Number of classes, split sizes and image channels from the builder's metadata.

  Also checks the files of the splits the run reads against that metadata
  (`data_integrity.check_files`), so a missing or truncated shard stops the run before anything
  is compiled.
  """
  data_integrity.check_files(builder, [config.train_split, config.eval_split])
  features = builder.info.features
  size = lambda split: builder.info.splits[split].num_examples
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


def _sample_crop(shape: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Inception-style crop box (8%-100% area, 3/4-4/3 aspect) of an image of `shape`."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin, crop_size


def _decode_image(encoded: tf.Tensor, feature: tfds.features.Image) -> tf.Tensor:
  """A whole image; JPEGs decoded as Pillow does, anything else as tfds does."""
  channels = feature.shape[-1] or 0
  image = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=channels, dct_method=JPEG_DCT),
      lambda: feature.decode_example(encoded))
  return tf.ensure_shape(image, feature.shape)


def decode_jpeg_crop(encoded: tf.Tensor, shape: tf.Tensor, begin: tf.Tensor,
                     crop_size: tf.Tensor, channels: int) -> tf.Tensor:
  """The pixels of a full decode's [begin : begin + crop_size] box, decoding only about it."""
  # libjpeg upsamples chroma at the edge columns of a cropped decode as if they were the
  # image's edges, which changes them by up to ~100 levels; one extra column each side, cut
  # off below, makes the box identical to a full decode (4:4:4, 4:2:2, 4:2:0, progressive).
  left = tf.maximum(begin[1] - 1, 0)
  right = tf.minimum(begin[1] + crop_size[1] + 1, shape[1])
  window = tf.stack([begin[0], left, crop_size[0], right - left])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=channels,
                                       dct_method=JPEG_DCT)
  return image[:, begin[1] - left:begin[1] - left + crop_size[1]]


def _decode_random_resized_crop(encoded: tf.Tensor, feature: tfds.features.Image, size: int,
                                seed: tf.Tensor) -> tf.Tensor:
  """Decodes only a random Inception-style crop, resizes it to size, random flip."""
  seeds = tf.random.experimental.stateless_split(seed, 2)

  def jpeg() -> tf.Tensor:
    shape = tf.image.extract_jpeg_shape(encoded)
    begin, crop_size = _sample_crop(shape, seeds[0])
    return decode_jpeg_crop(encoded, shape, begin, crop_size, feature.shape[-1] or 0)

  def other() -> tf.Tensor:  # PNG and the rest: decode whole, then crop the same box
    image = _decode_image(encoded, feature)
    begin, crop_size = _sample_crop(tf.shape(image), seeds[0])
    return tf.slice(image, begin, crop_size)

  image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
  image = tf.image.resize(image, [size, size], method="bicubic")
  return tf.image.stateless_random_flip_left_right(image, seeds[1])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """densenet_jax.imagenet's eval transform (torchvision's Resize + CenterCrop) in TF.

  The shorter side becomes resize_for_crop(size) (256 for 224) and the longer one
  int(resize * long / short), both as torchvision computes them; antialiased bilinear
  resampling is Pillow's BILINEAR filter. Pillow rounds to uint8, so the result is rounded
  too; Pillow also rounds between its horizontal and vertical passes, which TF does not, so
  about 15% of pixels differ from Pillow's by 1 level (never more: tests/input_pipeline_test).
  """
  resize = imagenet.resize_for_crop(size)
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  new_h = tf.where(w <= h, resize * h // w, resize)
  new_w = tf.where(w <= h, resize, resize * w // h)
  image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
  image = tf.round(tf.clip_by_value(image, 0.0, 255.0))
  # torchvision rounds the offsets half to even (Python's round), as tf.round does.
  top = tf.cast(tf.round((new_h - size) / 2), tf.int32)
  left = tf.cast(tf.round((new_w - size) / 2), tf.int32)
  return tf.slice(image, tf.stack([top, left, 0]), [size, size, -1])


def host_cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def input_threads(config: ml_collections.ConfigDict) -> int:
  """tf.data threads: config.input_threads, or (0) every core with an accelerator, else 2."""
  if config.input_threads > 0:
    threads, why = config.input_threads, "config.input_threads"
  elif jax.default_backend() != "cpu":
    threads, why = host_cores(), f"all cores; JAX computes on {jax.default_backend()}"
  else:
    threads, why = 2, "JAX computes on the same CPU cores"
  _log_threads(threads, why)
  return threads


@functools.cache
def _log_threads(threads: int, why: str) -> None:
  """Logs the choice once per process (eval iterators are made again at every evaluation)."""
  logging.info("tf.data input pipeline: %d threads (%s).", threads, why)


# Examples read contiguously from one shard: one seek per block (TFRecord skips seek past
# records, ~7 us each) instead of one per example.
BLOCK = 256
# Shards read at once into a window; fixed, so the read order never depends on the host.
READ_CYCLE = 8


@dataclasses.dataclass(frozen=True)
class Window:
  """A shuffle window: blocks of (file, skip, take) records and the order to emit them in."""

  files: list[str]
  skips: list[int]
  takes: list[int]
  order: np.ndarray  # indices into the window's records, in read order; a resume drops a prefix


def split_blocks(builder: tfds.core.DatasetBuilder, split: str) -> list[tuple[str, int, int]]:
  """The split's records in stored order as (file, skip, take) runs of at most BLOCK."""
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise errors.UserError(
        f"Dataset '{builder.info.name}' is stored as {builder.info.file_format.value}; the "
        f"trainer reads TFRecord shards. Prepare it again with file_format='tfrecord'.")
  blocks = []
  for fi in builder.info.splits[split].file_instructions:
    for skip in range(fi.skip, fi.skip + fi.take, BLOCK):
      blocks.append((fi.filename, skip, min(BLOCK, fi.skip + fi.take - skip)))
  return blocks


def epoch_windows(blocks: list[tuple[str, int, int]], window: int, seed: int,
                  start: int) -> list[Window]:
  """The epoch's order from example `start` on: shuffled blocks, shuffled within windows.

  Blocks are permuted, grouped into windows of about `window` examples, and each window is
  permuted whole, all from `seed` alone: a resume at any example reads one window, however far
  into the epoch it is, where a shuffle buffer would have to replay the epoch up to there.
  """
  rng = np.random.default_rng(seed)
  ids = rng.permutation(len(blocks))
  per_window = max(1, window // BLOCK)
  windows, position = [], 0
  for first in range(0, len(ids), per_window):
    chosen = [blocks[i] for i in ids[first:first + per_window]]
    size = sum(take for _, _, take in chosen)
    order = rng.permutation(size)
    if position + size > start:
      files, skips, takes = (list(x) for x in zip(*chosen))
      windows.append(Window(files, skips, takes, order[max(0, start - position):]))
    position += size
  return windows


def _read_windows(windows: list[Window]) -> tf.data.Dataset:
  """Serialized records in the windows' order."""
  ragged = lambda rows, dtype: tf.RaggedTensor.from_row_lengths(
      tf.constant(np.concatenate(rows), dtype), [len(r) for r in rows])
  columns = (ragged([np.array(w.files) for w in windows], tf.string),
             ragged([np.array(w.skips, np.int64) for w in windows], tf.int64),
             ragged([np.array(w.takes, np.int64) for w in windows], tf.int64),
             ragged([w.order for w in windows], tf.int64))

  def window(files: tf.Tensor, skips: tf.Tensor, takes: tf.Tensor, order: tf.Tensor
             ) -> tf.data.Dataset:
    records = tf.data.Dataset.from_tensor_slices((files, skips, takes)).interleave(
        lambda f, s, t: tf.data.TFRecordDataset(f).skip(s).take(t),
        cycle_length=READ_CYCLE, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    whole = records.batch(tf.reduce_sum(takes))
    return whole.map(lambda r: tf.gather(r, order)).unbatch()

  return tf.data.Dataset.from_tensor_slices(columns).flat_map(window)


def train_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                   local_batch: int, steps_per_epoch: int, start_step: int
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Local training batches from global step `start_step` on, epoch after epoch."""
  split = tfds.split_for_jax_process(config.train_split, drop_remainder=True)
  options = _options(input_threads(config))
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    ds = _train_epoch(builder, config, split, local_batch, epoch, skip)
    first = epoch * steps_per_epoch + skip  # the global step of this epoch's first batch
    yield from data_integrity.name_damaged_records(
        iter(tfds.as_numpy(ds.with_options(options))), builder, config.train_split,
        lambda i, first=first: f"while reading the batch of step {first + i + 1}")
    epoch, skip = epoch + 1, 0


def _train_epoch(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                 split: str, local_batch: int, epoch: int, skip: int) -> tf.data.Dataset:
  epoch_seed = (config.seed * 100_003 + epoch) % 2**31
  start = skip * local_batch
  windows = epoch_windows(split_blocks(builder, split), config.shuffle_buffer, epoch_seed, start)
  # Holds up to one window of read records, so the next window is read while this one is used.
  ds = _read_windows(windows).prefetch(max(BLOCK, config.shuffle_buffer))
  # Indices count from the epoch's start, so a resume keeps every augmentation seed.
  ds = ds.enumerate(start=start)
  features = builder.info.features
  size = config.image_size

  def decode(i: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
    ex = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
    if config.augment == "imagenet":
      image = _decode_random_resized_crop(ex["image"], features["image"], size, tf.stack(
          [tf.constant(epoch_seed, tf.int64), i]))
    else:
      image = _decode_image(ex["image"], features["image"])
    return {"image": image, "label": ex["label"]}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.enumerate(start=skip)

  def prepare(step: tf.Tensor, batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    images = batch["image"]
    if config.augment == "cifar":
      images = _augment_cifar_batch(images, tf.stack(
          [tf.constant(epoch_seed, tf.int64), step]))
    return {"image": _normalize(images, config), "label": batch["label"]}

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(2)


def eval_iterator(builder: tfds.core.DatasetBuilder, config: ml_collections.ConfigDict,
                  channels: int, local_batch: int, num_batches: int
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_batches` local eval batches; padding rows carry mask 0."""
  split = tfds.split_for_jax_process(config.eval_split, drop_remainder=False)
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  feature = builder.info.features["image"]
  size = config.image_size

  def decode(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    image = _decode_image(ex["image"], feature)
    if config.augment == "imagenet":
      image = center_crop(image, size)
    return {"image": image, "label": ex["label"]}

  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(lambda ex: {"image": _normalize(ex["image"], config), "label": ex["label"],
                          "mask": tf.constant(1.0)})
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([size, size, channels]),
      "label": tf.constant(0, tf.int64), "mask": tf.constant(0.0)}).repeat()
  ds = ds.concatenate(padding).batch(local_batch).take(num_batches)
  options = _options(input_threads(config))
  return data_integrity.name_damaged_records(
      iter(tfds.as_numpy(ds.prefetch(2).with_options(options))), builder, config.eval_split,
      lambda i: f"during evaluation (batch {i + 1})")


def eval_batches_needed(num_eval: int, local_batch: int) -> int:
  """Batches each process runs so that the largest per-process shard is fully covered."""
  largest_shard = -(-num_eval // jax.process_count())
  return max(1, -(-largest_shard // local_batch))


def _options(threads: int) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  # A private pool bounds tf.data's threads (its default pool has one per core); the autotune
  # budget caps what autotuning may assume it can use.
  options.threading.private_threadpool_size = threads
  options.autotune.cpu_budget = threads
  return options
