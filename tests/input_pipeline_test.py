"""The input pipeline on real on-disk tfds datasets: exact resume, the eval transform, threads."""

import io

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from densenet_jax import imagenet, predict
from train import input_pipeline


def smooth_images(rng, sizes):
  """uint8 RGB images of the given (h, w): 8-pixel blocks of colour plus noise (JPEG-friendly)."""
  out = []
  for h, w in sizes:
    coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.float32)
    img = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:h, :w] + rng.normal(0, 6, (h, w, 3))
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def write_dataset(data_dir, name, splits, encoding_format, shape=(None, None, 3)):
  """A real tfds dataset of {'image', 'label'} from {split: (images, labels)}, in 3 shards."""
  def split(images, labels):
    return tf.data.Dataset.from_generator(
        lambda: ({"image": i, "label": l} for i, l in zip(images, labels)),
        output_signature={"image": tf.TensorSpec(shape, tf.uint8),
                          "label": tf.TensorSpec((), tf.int64)})
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=shape, encoding_format=encoding_format),
      "label": tfds.features.ClassLabel(num_classes=10)})
  return tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version="1.0.0", features=features, data_dir=str(data_dir),
      split_datasets={k: split(*v) for k, v in splits.items()},
      download_config=tfds.download.DownloadConfig(num_shards=3))


@pytest.fixture(scope="module")
def builders(tmp_path_factory):
  """Variable-size images as JPEG and as PNG (the other decode path); 32x32 PNG for CIFAR."""
  data_dir = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)
  train = smooth_images(rng, rng.integers(40, 81, (48, 2)))
  test = smooth_images(rng, rng.integers(40, 81, (12, 2)))
  labels = lambda n: rng.integers(0, 10, n).astype(np.int64)
  splits = {"train": (train, labels(48)), "test": (test, labels(12))}
  cifar = {"train": (smooth_images(rng, [(32, 32)] * 40), labels(40)),
           "test": (smooth_images(rng, [(32, 32)] * 8), labels(8))}
  return {"jpeg": write_dataset(data_dir, "tiny_jpeg", splits, "jpeg"),
          "png": write_dataset(data_dir, "tiny_png", splits, "png"),
          "cifar": write_dataset(data_dir, "tiny_cifar", cifar, "png", (32, 32, 3))}


def config_for(augment):
  c = default.get_config()
  c.augment = augment
  c.shuffle_buffer = 16  # windows of 3 blocks of 5 (BLOCK below): several per epoch
  c.mean, c.std = (0.0,), (1.0,)
  c.image_size = 32
  c.seed = 3
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


@pytest.mark.parametrize("dataset,augment", [("jpeg", "imagenet"), ("png", "imagenet"),
                                             ("cifar", "cifar")])
def test_resumed_batches_equal_the_uninterrupted_ones(builders, dataset, augment, monkeypatch):
  monkeypatch.setattr(input_pipeline, "BLOCK", 5)  # blocks span shard ends; resumes cross windows
  builder, config = builders[dataset], config_for(augment)
  local_batch = 4
  steps = builder.info.splits["train"].num_examples // local_batch
  straight = take(input_pipeline.train_iterator(builder, config, local_batch, steps, 0),
                  steps + 4)
  assert straight[0]["image"].shape == (local_batch, 32, 32, 3)
  # Epoch 2 shows the same examples in another order with other augmentation.
  assert not np.array_equal(straight[0]["image"], straight[steps]["image"])
  for start in (1, 4, steps - 1, steps + 1):
    resumed = take(input_pipeline.train_iterator(builder, config, local_batch, steps, start),
                   steps + 4 - start)
    for n, (a, b) in enumerate(zip(straight[start:], resumed), start):
      np.testing.assert_array_equal(a["label"], b["label"], err_msg=f"start {start} batch {n}")
      np.testing.assert_array_equal(a["image"], b["image"], err_msg=f"start {start} batch {n}")


def _records(windows):
  """(file, record index) of every example the windows emit, in order."""
  out = []
  for w in windows:
    read = [(f, s + i) for f, s, t in zip(w.files, w.skips, w.takes) for i in range(t)]
    out += [read[j] for j in w.order]
  return out


def test_epoch_order_is_a_permutation_and_any_start_is_its_tail():
  # Three shards as tfds splits them for one process: shard ends cut blocks short.
  blocks = [(f, s, min(7, end - s)) for f, begin, end in [("a", 3, 40), ("b", 0, 25), ("c", 0, 9)]
            for s in range(begin, end, 7)]
  everything = sorted((f, s + i) for f, s, t in blocks for i in range(t))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(input_pipeline, "BLOCK", 7)
    epoch = _records(input_pipeline.epoch_windows(blocks, 20, seed=5, start=0))
    assert sorted(epoch) == everything and len(epoch) == 71
    assert epoch != sorted(epoch)
    other = _records(input_pipeline.epoch_windows(blocks, 20, seed=6, start=0))
    assert sorted(other) == everything and other != epoch
    for start in range(71):
      resumed = input_pipeline.epoch_windows(blocks, 20, seed=5, start=start)
      assert _records(resumed) == epoch[start:], start
      # A resume reads at most one window it does not use, wherever it starts.
      assert sum(resumed[0].takes) <= 21 and len(resumed[0].order) > 0


def test_processes_read_disjoint_halves_covering_the_split(builders):
  builder = builders["cifar"]
  halves = [input_pipeline.split_blocks(
      builder, tfds.split_for_jax_process("train", process_index=i, process_count=2))
            for i in range(2)]
  records = [{(f, s + i) for f, s, t in h for i in range(t)} for h in halves]
  assert len(records[0]) == len(records[1]) == 20 and not records[0] & records[1]
  assert all(t <= input_pipeline.BLOCK for h in halves for _, _, t in h)


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1},
                                     {"subsampling": 2}, {"progressive": True}])
def test_jpeg_crop_decode_equals_full_decode_then_crop(options):
  rng = np.random.default_rng(1)
  for image in smooth_images(rng, rng.integers(20, 120, (6, 2))):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", **options)
    encoded = buffer.getvalue()
    full = tf.io.decode_jpeg(encoded, dct_method=input_pipeline.JPEG_DCT).numpy()
    h, w = image.shape[:2]
    shape = tf.image.extract_jpeg_shape(encoded)
    for _ in range(20):
      ch, cw = rng.integers(1, h + 1), rng.integers(1, w + 1)
      y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
      # Without the extra edge columns the first or last column is off by up to ~100 levels.
      crop = input_pipeline.decode_jpeg_crop(encoded, shape, tf.constant([y, x, 0]),
                                             tf.constant([ch, cw, -1]), 3)
      np.testing.assert_array_equal(crop, full[y:y + ch, x:x + cw], err_msg=f"{x, y, cw, ch}")


def test_eval_transform_matches_torchvision_on_pillow(builders):
  builder, config = builders["jpeg"], config_for("imagenet")
  config.eval_split = "test"
  batches = list(input_pipeline.eval_iterator(builder, config, 3, 5, 3))
  ours = np.concatenate([b["image"] for b in batches])[:12]
  assert np.concatenate([b["mask"] for b in batches]).tolist() == [1.0] * 12 + [0.0] * 3
  encoded = builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()})
  crop = config.image_size
  reference = np.stack([
      predict.preprocess(Image.open(io.BytesIO(ex["image"])), imagenet.resize_for_crop(crop),
                         crop, mean=(0.0,) * 3, std=(1 / 255,) * 3)
      for ex in tfds.as_numpy(encoded)])
  assert ours.shape == reference.shape == (12, crop, crop, 3)
  diff = np.abs(ours - reference)
  # Measured: at most 1 level of 255; 14-17% of pixels differ (Pillow rounds to uint8
  # between its horizontal and vertical passes, TF does not).
  assert diff.max() <= 1 + 1e-3, diff.max()
  assert (diff > 0.5).mean() < 0.25


def test_input_threads_resolution(monkeypatch):
  config = default.get_config()
  assert config.input_threads == 0
  assert jax.default_backend() == "cpu"
  assert input_pipeline.input_threads(config) == 2  # XLA computes on the same cores
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(input_pipeline, "host_cores", lambda: 48)
  assert input_pipeline.input_threads(config) == 48
  config.input_threads = 5
  assert input_pipeline.input_threads(config) == 5


def test_a_dataset_not_stored_as_tfrecord_is_refused_with_the_fix(builders):
  builder = builders["cifar"]
  array_record = type("Info", (), {"name": "tiny_cifar",
                                   "file_format": tfds.core.FileFormat.ARRAY_RECORD})()
  fake = type("Builder", (), {"info": array_record})()
  with pytest.raises(input_pipeline.errors.UserError, match="array_record.*file_format='tfrecord'"):
    input_pipeline.split_blocks(fake, "train")
  assert input_pipeline.split_blocks(builder, "train")  # the TFRecord one reads
