"""Is the data intact? The shards of a run's splits checked against dataset_info.json before
anything compiles, and a damaged record met mid-run named (file, step, fix) in one error.

Every message ends with how to prepare the data again; a run's checkpoints are never touched,
so the rerun resumes.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from train import digits, errors


class DataCorruptError(errors.DatasetError, RuntimeError):
  """The dataset's files do not match its dataset_info.json, or a record cannot be read."""


# TFRecord framing around each serialized example: uint64 length, masked CRC32C of the length,
# masked CRC32C of the data. dataset_info.json's numBytes counts the examples alone.
TFRECORD_FRAMING = 16
# Splits at most this large are read whole (every record's CRC) before compiling: a damaged
# eval file would otherwise surface only at the first evaluation.
VERIFY_RECORDS_BYTES = 256 << 20
# On a record error mid-run, how long to look for the damaged file before naming only the split.
LOCATE_SECONDS = 30.0


def open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """tfds.builder(name), prepared or not; a damaged dataset_info.json, or a dataset folder
  left without one, raises DataCorruptError."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.dataset_info.DatasetInfoFileError as e:
    raise DataCorruptError(f"{e}: the file is damaged. {_reprepare_hint(name, data_dir)}") from e
  leftover = 0 if builder.is_prepared() else _files_without_info(builder.data_dir)
  if leftover:
    raise DataCorruptError(
        f"{builder.data_dir} holds {leftover} files but no dataset_info.json (an interrupted "
        f"copy or preparation). {_reprepare_hint(name, data_dir)}")
  return builder


def _files_without_info(folder: str) -> int:
  """How many files a dataset version folder holds when its dataset_info.json is missing."""
  try:
    if not tf.io.gfile.isdir(folder) or tf.io.gfile.exists(os.path.join(folder,
                                                                        "dataset_info.json")):
      return 0
    return len(tf.io.gfile.listdir(folder))
  except tf.errors.OpError:
    return 0


def _reprepare_hint(name: str, data_dir: str | None) -> str:
  """How to prepare a damaged dataset again; a run's checkpoints are never affected."""
  root = os.path.expanduser(data_dir or "~/tensorflow_datasets")
  folder = os.path.join(root, name)
  if name == digits.NAME:
    return (f"Delete {folder} and rerun: it is written again from scikit-learn. A rerun of a "
            f"run resumes from its newest checkpoint (checkpoints are kept).")
  return (f"Prepare the dataset again: delete {folder} and rerun (tfds downloads it, or builds it "
          f"from --config.manual_dir), or copy an intact {folder} here. A rerun of a run resumes "
          f"from its newest checkpoint (checkpoints are kept).")


def base_splits(splits: Iterable[str]) -> list[str]:
  """The stored splits behind split expressions: 'train[:90%]+extra' -> ['train', 'extra']."""
  names = []
  for split in splits:
    for part in split.split("+"):
      name = re.sub(r"\[.*\]$", "", part.strip())
      if name and name not in names:
        names.append(name)
  return names


def check_files(builder: tfds.core.DatasetBuilder, splits: Iterable[str]) -> None:
  """Every shard of `splits` exists; on a local disk, their sizes add up to what
  dataset_info.json records, and a split small enough is read whole (every record's CRC).

  Raises DataCorruptError naming the file (or the split) and how to prepare the data again.
  """
  info = builder.info
  if info.file_format != tfds.core.FileFormat.TFRECORD:
    return  # split_blocks names the problem
  hint = _reprepare_hint(info.name, _data_root(builder))
  for name in base_splits(splits):
    if name not in info.splits:
      continue  # tfds names unknown splits itself
    split = info.splits[name]
    paths = [os.fspath(p) for p in split.filepaths]
    local = all("://" not in p for p in paths)
    if not local:  # a stat per shard on GCS is slow; one listing shows missing files
      present = set(tf.io.gfile.glob(os.path.join(builder.data_dir, "*")))
      missing = [p for p in paths if p not in present]
    else:
      missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
      raise DataCorruptError(
          f"Split '{name}' of {info.name} is incomplete: {missing[0]} is missing"
          f"{f' (and {len(missing) - 1} more files)' if len(missing) > 1 else ''}. {hint}")
    if not local or not int(split.num_bytes):
      continue
    expected = int(split.num_bytes) + TFRECORD_FRAMING * split.num_examples
    actual = sum(os.path.getsize(p) for p in paths)
    if actual != expected:
      bad = _misframed_file(paths, split.shard_lengths) or (
          f"its {len(paths)} files" if len(paths) > 1 else paths[0])
      raise DataCorruptError(
          f"Split '{name}' of {info.name} is damaged: {bad} does not match dataset_info.json "
          f"({actual:,} bytes on disk, {expected:,} expected; a truncated or interrupted "
          f"copy?). {hint}")
    if actual <= VERIFY_RECORDS_BYTES:
      for path in paths:
        error = _record_error(path)
        if error:
          raise DataCorruptError(f"Split '{name}' of {info.name} is damaged: {path} has an "
                                 f"unreadable record ({error}). {hint}")


def _data_root(builder: tfds.core.DatasetBuilder) -> str:
  """The data_dir holding `builder` (<data_dir>/<name>/<version>)."""
  return os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))


def _misframed_file(paths: list[str], shard_lengths: list[int]) -> str | None:
  """The first shard whose TFRecord framing does not hold its recorded number of examples.

  Walks the length headers only (12 bytes a record), so it is cheap even for large shards."""
  for path, count in zip(paths, shard_lengths):
    size, position, records = os.path.getsize(path), 0, 0
    with open(path, "rb") as f:
      while position + 12 <= size and records <= count:
        f.seek(position)
        length = int.from_bytes(f.read(8), "little")
        position += length + TFRECORD_FRAMING
        records += 1
    if position != size or records != count:
      return path
  return None


def _record_error(path: str) -> str | None:
  """The error reading every record of a TFRecord file (CRCs included), or None."""
  try:
    tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1).numpy()
  except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as e:
    return _op_error_text(e)
  return None


def _op_error_text(e: tf.errors.OpError) -> str:
  """A TF error's message without its graph-function prefix and op suffix."""
  text = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message or str(e))
  text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S)
  return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _locate_bad_record(paths: list[str], deadline: float) -> str | None:
  """The first of `paths` with an unreadable record, looked for until `deadline`."""
  for path in paths:
    if time.time() > deadline:
      return None
    if _record_error(path):
      return path
  return None


def name_damaged_records(batches: Iterator[dict[str, np.ndarray]], builder: tfds.core.DatasetBuilder,
                 split: str, where: Callable[[int], str]) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, with a damaged record turned into one DataCorruptError naming the file (when
  found within LOCATE_SECONDS), the split, where the run was, and the fix."""
  index = 0
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
      info = builder.info
      names = base_splits([split])
      paths = [os.fspath(p) for n in names if n in info.splits
               for p in info.splits[n].filepaths]
      found = _locate_bad_record(paths, time.time() + LOCATE_SECONDS) if all(
          "://" not in p for p in paths) else None
      place = found or f"a file of split '{split}' in {builder.data_dir}"
      raise DataCorruptError(
          f"{info.name} data is damaged: {place} cannot be read ({_op_error_text(e)}) "
          f"{where(index)}. {_reprepare_hint(info.name, _data_root(builder))}") from e
    index += 1
    yield batch
