"""Damaged data and unusable workdirs: one message naming the file and the fix, before compiling
where it can be checked up front, and naming the split and step where it cannot."""

import re
import shutil
import subprocess

import ml_collections
import pytest
import tensorflow_datasets as tfds

from configs import digits_bc
from train import (checkpointing, data_integrity, digits, errors, input_pipeline,
                   workdir as workdir_lib)
from train_test import REPO, digits_command

SHARD = "sklearn_digits/1.0.0/sklearn_digits-{}.tfrecord-00000-of-00001"


@pytest.fixture(scope="module")
def _digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("digits")
  digits.builder(str(data_dir))
  return data_dir


@pytest.fixture
def data_dir(tmp_path, _digits_dir):
  """A private copy of the digits dataset, free to damage."""
  shutil.copytree(_digits_dir, tmp_path / "tfds")
  return tmp_path / "tfds"


def config_for(data_dir):
  c = digits_bc.get_config()
  c.data_dir = str(data_dir)
  return c


def overwrite(path, offset, data=b"\xff\xff\xff\xff"):
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(data)


def test_truncated_shard_is_named_before_anything_is_compiled(data_dir):
  shard = data_dir / SHARD.format("train")
  with open(shard, "r+b") as f:
    f.truncate(200_000)
  builder = input_pipeline.get_builder(config_for(data_dir))
  with pytest.raises(data_integrity.DataCorruptError,
                     match=rf"Split 'train' .* damaged: {shard} does not match dataset_info.json "
                           r"\(200,000 bytes on disk, 249,991 expected.*Delete .* and rerun"):
    input_pipeline.dataset_info(builder, config_for(data_dir))


def test_missing_shard_is_named(data_dir):
  shard = data_dir / SHARD.format("test")
  shard.unlink()
  builder = input_pipeline.get_builder(config_for(data_dir))
  with pytest.raises(data_integrity.DataCorruptError,
                     match=rf"Split 'test' .* incomplete: {shard} is missing"):
    input_pipeline.dataset_info(builder, config_for(data_dir))


def test_corrupt_record_of_a_small_eval_split_is_found_before_training(data_dir):
  shard = data_dir / SHARD.format("test")
  overwrite(shard, 30_000)  # same size: only reading the records (their CRCs) shows it
  builder = input_pipeline.get_builder(config_for(data_dir))
  with pytest.raises(data_integrity.DataCorruptError,
                     match=rf"Split 'test' .* {shard} has an unreadable record \(corrupted record"):
    input_pipeline.dataset_info(builder, config_for(data_dir))


def test_a_sliced_or_joined_split_checks_its_stored_splits():
  assert data_integrity.base_splits(["train[:90%]+extra", "train[90%:]", "test"]) == [
      "train", "extra", "test"]


def test_corrupt_record_mid_training_names_the_file_the_step_and_the_fix(data_dir):
  shard = data_dir / SHARD.format("train")
  overwrite(shard, 100_000)
  config = config_for(data_dir)
  builder = input_pipeline.get_builder(config)
  batches = input_pipeline.train_iterator(builder, config, 64, 22, start_step=5)
  with pytest.raises(data_integrity.DataCorruptError) as e:
    for _ in range(40):
      next(batches)
  text = str(e.value)
  assert f"{shard} cannot be read (corrupted record at" in text
  # Read-ahead decides which batch meets the record first: a step of this run, not a fixed one.
  step = re.search(r"while reading the batch of step (\d+)\.", text)
  assert step and 6 <= int(step.group(1)) <= 45, text
  assert "Delete" in text and "checkpoints are kept" in text and "\n" not in text


def test_corrupt_record_during_evaluation_names_the_file(data_dir):
  shard = data_dir / SHARD.format("test")
  overwrite(shard, 30_000)
  config = config_for(data_dir)
  builder = input_pipeline.get_builder(config)
  with pytest.raises(data_integrity.DataCorruptError,
                     match=rf"{shard} cannot be read .* during evaluation"):
    list(input_pipeline.eval_iterator(builder, config, 1, 128, 3))


def test_digits_without_dataset_info_is_one_message(data_dir):
  (data_dir / "sklearn_digits/1.0.0/dataset_info.json").unlink()
  with pytest.raises(errors.DatasetError, match=r"holds files but no dataset_info.json.*Delete"):
    input_pipeline.get_builder(config_for(data_dir))


def test_tfds_dataset_without_dataset_info_is_one_message(tmp_path, _cifar10_dir):
  shutil.copytree(_cifar10_dir, tmp_path / "tfds")
  version = tfds.builder("cifar10", data_dir=str(tmp_path / "tfds")).data_dir
  (tmp_path / "tfds" / "cifar10" / version.split("/")[-1] / "dataset_info.json").unlink()
  config = ml_collections.ConfigDict({"dataset": "cifar10", "data_dir": str(tmp_path / "tfds"),
                                      "manual_dir": "", "download": False})
  with pytest.raises(data_integrity.DataCorruptError,
                     match=r"holds \d+ files but no dataset_info.json.*Prepare the dataset again"):
    input_pipeline.get_builder(config)


def test_checkpoints_path_that_is_a_file_is_refused_at_once(tmp_path):
  (tmp_path / "checkpoints").write_text("")
  with pytest.raises(errors.WorkdirError, match=r"checkpoints is a file.*Move the file away"):
    checkpointing.Checkpointer(tmp_path, 1, 5)


@pytest.fixture
def read_only_dir(tmpfs):
  mount = tmpfs("ro", "64k")
  (mount / "run").mkdir()
  subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
  return mount / "run"


def test_read_only_workdir_is_one_message(read_only_dir):
  with pytest.raises(errors.WorkdirError, match=r"Cannot write to --workdir=.*Read-only file "
                                                r"system. Choose a writable directory"):
    with workdir_lib.hold(read_only_dir):
      pass


def _cli(workdir, data_dir):
  return subprocess.run(digits_command(workdir, data_dir, "--config.model_overrides.depth=10"),
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_damaged_data_and_checkpoints_file_fail_in_one_line_before_compiling(tmp_path,
                                                                                 data_dir):
  with open(data_dir / SHARD.format("train"), "r+b") as f:
    f.truncate(1000)
  result = _cli(tmp_path / "run", data_dir)
  assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
  assert result.stderr.startswith("error: Split 'train' of sklearn_digits is damaged")
  assert "Compiling" not in result.stdout

  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "checkpoints").write_text("")
  result = _cli(tmp_path / "other", tmp_path / "fresh")
  assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
  assert "checkpoints is a file" in result.stderr and "Compiling" not in result.stdout
