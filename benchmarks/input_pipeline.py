"""Images/s of the training input pipelines of train/input_pipeline.py on synthetic tfds data.

Writes two small on-disk tfds datasets once (`tfds.dataset_builders.store_as_tfds_dataset`,
under --data-dir), then times `train.input_pipeline.train_iterator` exactly as the trainer
uses it (shuffle, decode, augmentation, batch, normalise, prefetch, the project's tf.data
options with `config.input_threads` = each value of --threads):

  cifar     32x32x3 PNG-encoded uint8 images, augment='cifar' (pad 4, random crop, flip),
            batch 64 -- the CIFAR recipe
  imagenet  JPEG images of random sizes (256..512 px a side), augment='imagenet' (Inception
            random-resized crop to 224, flip; one image at a time, bicubic), batch 32

Rows (JSON lines on stdout):
  bench=input_pipeline         steady-state rate (median over --batches batches after
                               --warmup), first-batch latency, cores busy (cpu_util: process
                               CPU s / wall s) and images per CPU second, per thread count
  bench=input_pipeline_resume  time to the first batch of a fresh iterator started at step 0
                               and at the epoch's last step (--no-resume: skipped)

The shuffle window (--shuffle-buffer) is smaller than an epoch, so the steady state includes
reading and decoding, and a late resume has to find its place in the epoch. --rev REV measures
train/input_pipeline.py as of git revision REV instead (e.g. the decode-before-skip pipeline
of 37666c9, whose thread pool is fixed at 2 and ignores --threads). Synthetic pixels are
smooth random noise so that JPEG sizes are realistic-ish (~30-60 KB at 400x400).

    python benchmarks/input_pipeline.py --which imagenet --threads 1 --threads 2
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # pylint: disable=g-import-not-at-top,wrong-import-position

COLUMNS = ("pipeline", "threads", "batch", "image", "examples", "first_batch_s", "img_per_s",
           "img_per_s_mean", "img_per_s_per_thread", "cpu_util", "img_per_cpu_s", "rev",
           "load_before", "load_after")
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


@functools.cache
def pipeline_module(rev: str | None) -> ModuleType:
  """train.input_pipeline, or its source at git revision `rev` loaded as a module."""
  if not rev:
    from train import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline
  source = subprocess.run(["git", "show", f"{rev}:train/input_pipeline.py"], cwd=_common.REPO,
                          capture_output=True, text=True, check=True).stdout
  path = os.path.join(tempfile.mkdtemp(), f"input_pipeline_{rev}.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location(f"input_pipeline_{rev}", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def bench_config(which: str, builder, data_dir: str, batch: int, threads: int,
                 shuffle_buffer: int):
  """The trainer's config for the synthetic dataset."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset = builder.info.name
  config.data_dir = data_dir
  config.batch_size = batch
  config.input_threads = threads
  config.shuffle_buffer = shuffle_buffer
  if which == "cifar":
    config.augment, config.image_size = "cifar", 32
  else:
    config.augment, config.image_size = "imagenet", 224
    config.mean, config.std = default.IMAGENET_MEAN, default.IMAGENET_STD
  return config


def measure(which: str, data_dir: str, num_train: int, batch: int, batches: int,
            warmup: int, threads: int = 2, shuffle_buffer: int = 256,
            rev: str | None = None) -> dict[str, Any]:
  """Steady-state images/s of the project's train_iterator on a synthetic dataset."""
  import statistics  # pylint: disable=g-import-not-at-top
  pipeline = pipeline_module(rev)
  t0 = time.perf_counter()
  builder = make_dataset(which, data_dir, num_train)
  prepare_s = time.perf_counter() - t0
  config = bench_config(which, builder, data_dir, batch, threads, shuffle_buffer)
  steps_per_epoch = num_train // batch
  needed = warmup + batches + 1
  if steps_per_epoch < needed:
    raise ValueError(f"{num_train} examples give {steps_per_epoch} batches of {batch} per "
                     f"epoch; need {needed}: raise --{which}-examples")
  load_before = _common.loadavg()
  it = pipeline.train_iterator(builder, config, batch, steps_per_epoch, 0)
  t0 = time.perf_counter()
  first = next(it)
  first_s = time.perf_counter() - t0
  assert first["image"].shape == (batch, config.image_size, config.image_size, 3), \
      first["image"].shape
  for _ in range(warmup):
    next(it)
  times = []
  t_all, cpu_all = time.perf_counter(), time.process_time()
  for _ in range(batches):
    t0 = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - t0)
  total = time.perf_counter() - t_all
  # CPU seconds of all this process's threads: on a shared machine the wall rate depends on
  # what the neighbours leave, the CPU cost per image much less.
  cpu_s = time.process_time() - cpu_all
  rate = batch / statistics.median(times)
  return {
      "bench": "input_pipeline", "pipeline": which, "threads": threads, "batch": batch,
      "image": config.image_size, "examples": num_train, "shuffle_buffer": shuffle_buffer,
      "prepare_s": round(prepare_s, 2), "first_batch_s": round(first_s, 3),
      "img_per_s": round(rate, 1), "img_per_s_mean": round(batch * batches / total, 1),
      "img_per_s_per_thread": round(rate / threads, 1), "batches": batches,
      "cpu_util": round(cpu_s / total, 2), "img_per_cpu_s": round(batch * batches / cpu_s, 1),
      "cores": _cores(), "rev": rev or _worktree_rev(),
      "load_before": load_before, "load_after": _common.loadavg(),
  }


def measure_resume(which: str, data_dir: str, num_train: int, batch: int, threads: int,
                   start_step: int, shuffle_buffer: int = 256,
                   rev: str | None = None) -> dict[str, Any]:
  """Seconds from creating the iterator at `start_step` to holding its first batch."""
  pipeline = pipeline_module(rev)
  builder = make_dataset(which, data_dir, num_train)
  config = bench_config(which, builder, data_dir, batch, threads, shuffle_buffer)
  steps_per_epoch = num_train // batch
  load_before = _common.loadavg()
  t0 = time.perf_counter()
  next(pipeline.train_iterator(builder, config, batch, steps_per_epoch, start_step))
  first_s = time.perf_counter() - t0
  return {
      "bench": "input_pipeline_resume", "pipeline": which, "threads": threads,
      "batch": batch, "examples": num_train, "shuffle_buffer": shuffle_buffer,
      "start_step": start_step, "steps_per_epoch": steps_per_epoch,
      "skipped_examples": start_step % steps_per_epoch * batch,
      "first_batch_s": round(first_s, 3), "cores": _cores(), "rev": rev or _worktree_rev(),
      "load_before": load_before, "load_after": _common.loadavg(),
  }


@functools.cache
def _worktree_rev() -> str:
  """HEAD's short hash, with '+edits' when train/input_pipeline.py differs from it."""
  git = lambda *a: subprocess.run(["git", *a], cwd=_common.REPO, capture_output=True, text=True)
  head = git("rev-parse", "--short", "HEAD").stdout.strip() or "worktree"
  edited = git("diff", "--quiet", "HEAD", "--", "train/input_pipeline.py").returncode != 0
  return head + ("+edits" if edited else "")


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--which", action="append", choices=("cifar", "imagenet"), default=None)
  p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
  p.add_argument("--cifar-examples", type=int, default=10_000)
  p.add_argument("--imagenet-examples", type=int, default=2_000)
  p.add_argument("--cifar-batch", type=int, default=64)
  p.add_argument("--imagenet-batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=20, help="timed batches")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--threads", type=int, action="append", default=None,
                 help="config.input_threads values to measure (default: 1 and 2)")
  p.add_argument("--shuffle-buffer", type=int, default=256)
  p.add_argument("--repeats", type=int, default=1, help="rounds over all thread counts")
  p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                 help="also time the first batch when resuming at the start / end of an epoch")
  p.add_argument("--rev", default=None, help="measure train/input_pipeline.py at this git rev")
  p.add_argument("--markdown", default=None)
  args = p.parse_args(argv)
  rows = []

  def emit(row: dict[str, Any]) -> None:
    _common.emit(row)
    if row["bench"] == "input_pipeline":
      _common.append_markdown(args.markdown, COLUMNS, row)
    rows.append(row)

  for which in args.which or ["cifar", "imagenet"]:
    n = args.cifar_examples if which == "cifar" else args.imagenet_examples
    b = args.cifar_batch if which == "cifar" else args.imagenet_batch
    # Alternating thread counts spreads a neighbour's load over both.
    for _ in range(args.repeats):
      for threads in args.threads or [1, 2]:
        emit(measure(which, args.data_dir, n, b, args.batches, args.warmup, threads,
                     args.shuffle_buffer, args.rev))
    if args.resume:
      for _ in range(args.repeats):
        for start in (0, n // b - 1):
          emit(measure_resume(which, args.data_dir, n, b, max(args.threads or [2]), start,
                              args.shuffle_buffer, args.rev))
  return rows


if __name__ == "__main__":
  main()
