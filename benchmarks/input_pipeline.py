"""Images/s of the training input pipelines of train/input_pipeline.py on synthetic tfds data.

Writes two small on-disk tfds datasets once (`tfds.dataset_builders.store_as_tfds_dataset`,
under --data-dir), then times `train.input_pipeline.train_iterator` exactly as the trainer
uses it (shuffle, batch, the vectorised augmentation, normalise, prefetch, the project's
tf.data options: private thread pool 2, autotune cpu_budget 1):

  cifar     32x32x3 PNG-encoded uint8 images, augment='cifar' (pad 4, random crop, flip),
            batch 64 -- the CIFAR recipe
  imagenet  JPEG images of random sizes (256..512 px a side), augment='imagenet' (Inception
            random-resized crop to 224, flip; one image at a time, bicubic), batch 32

Reports the first-batch latency (shuffle-buffer fill) separately from the steady-state rate
(median over --batches batches after --warmup). Synthetic pixels are smooth random noise so
that JPEG sizes are realistic-ish (~30-60 KB at 400x400).

    python benchmarks/input_pipeline.py --which cifar --which imagenet
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ("pipeline", "batch", "image", "examples", "first_batch_s", "img_per_s",
           "img_per_s_mean", "load_before", "load_after")
DEFAULT_DATA_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "densenet_jax_bench_tfds")


def _smooth_images(rng, n: int, h: int, w: int):
  """n uint8 images (h, w, 3): nearest-upsampled coarse noise plus fine noise."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  coarse = rng.integers(0, 256, (n, h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
  img = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
  img += rng.normal(0, 8, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(which: str, data_dir: str, num_train: int):
  """The builder of the synthetic dataset, written on first use."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, version = f"bench_fake_{which}_{num_train}", "1.0.0"
  path = os.path.join(data_dir, name, version)
  try:
    return tfds.builder_from_directory(path)
  except (FileNotFoundError, tfds.core.registered.DatasetNotFoundError, OSError):
    pass
  rng = np.random.default_rng(0)
  num_test = max(1, num_train // 10)
  if which == "cifar":
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)})

    def split(n):
      return tf.data.Dataset.from_tensor_slices(
          {"image": _smooth_images(rng, n, 32, 32),
           "label": rng.integers(0, 10, n).astype(np.int64)})
  else:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(num_classes=1000)})

    def split(n):
      sizes = rng.integers(256, 513, (n, 2))
      seeds = rng.integers(0, 2**31, n)

      def gen():
        for (h, w), s in zip(sizes, seeds):
          r = np.random.default_rng(int(s))
          yield {"image": _smooth_images(r, 1, int(h), int(w))[0],
                 "label": np.int64(r.integers(0, 1000))}
      return tf.data.Dataset.from_generator(gen, output_signature={
          "image": tf.TensorSpec((None, None, 3), tf.uint8),
          "label": tf.TensorSpec((), tf.int64)})
  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=features, data_dir=data_dir,
      split_datasets={"train": split(num_train), "test": split(num_test)},
      description=f"synthetic {which}-like images for benchmarks/input_pipeline.py")
  return tfds.builder_from_directory(path)


def measure(which: str, data_dir: str, num_train: int, batch: int, batches: int,
            warmup: int) -> dict[str, Any]:
  """Steady-state images/s of the project's train_iterator on a synthetic dataset."""
  import statistics  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from train import input_pipeline  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  builder = make_dataset(which, data_dir, num_train)
  prepare_s = time.perf_counter() - t0
  config = default.get_config()
  config.dataset = builder.info.name
  config.data_dir = data_dir
  config.batch_size = batch
  if which == "cifar":
    config.augment, config.image_size = "cifar", 32
  else:
    config.augment, config.image_size = "imagenet", 224
    config.mean, config.std = default.IMAGENET_MEAN, default.IMAGENET_STD
    config.shuffle_buffer = min(config.shuffle_buffer, 10_000)
  steps_per_epoch = num_train // batch
  needed = warmup + batches + 1
  if steps_per_epoch < needed:
    raise ValueError(f"{num_train} examples give {steps_per_epoch} batches of {batch} per "
                     f"epoch; need {needed}: raise --num-train")
  load_before = _common.loadavg()
  it = input_pipeline.train_iterator(builder, config, batch, steps_per_epoch, 0)
  t0 = time.perf_counter()
  first = next(it)
  first_s = time.perf_counter() - t0
  assert first["image"].shape == (batch, config.image_size, config.image_size, 3), \
      first["image"].shape
  for _ in range(warmup):
    next(it)
  times = []
  t_all = time.perf_counter()
  for _ in range(batches):
    t0 = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - t0)
  total = time.perf_counter() - t_all
  return {
      "bench": "input_pipeline", "pipeline": which, "batch": batch,
      "image": config.image_size, "examples": num_train, "prepare_s": round(prepare_s, 2),
      "first_batch_s": round(first_s, 3),
      "img_per_s": round(batch / statistics.median(times), 1),
      "img_per_s_mean": round(batch * batches / total, 1),
      "batches": batches, "load_before": load_before, "load_after": _common.loadavg(),
  }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--which", action="append", choices=("cifar", "imagenet"), default=None)
  p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
  p.add_argument("--cifar-examples", type=int, default=10_000)
  p.add_argument("--imagenet-examples", type=int, default=1_200)
  p.add_argument("--cifar-batch", type=int, default=64)
  p.add_argument("--imagenet-batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=20, help="timed batches")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--markdown", default=None)
  args = p.parse_args(argv)
  rows = []
  for which in args.which or ["cifar", "imagenet"]:
    n = args.cifar_examples if which == "cifar" else args.imagenet_examples
    b = args.cifar_batch if which == "cifar" else args.imagenet_batch
    row = measure(which, args.data_dir, n, b, args.batches, args.warmup)
    _common.emit(row)
    _common.append_markdown(args.markdown, COLUMNS, row)
    rows.append(row)
  return rows


if __name__ == "__main__":
  main()
