"""Hostile weight files and images: small files that would expand to gigabytes are refused from
their headers, before anything is allocated; odd image sizes and modes are handled without
huge intermediates; a missing optional package names the extra that installs it."""

import json
import math
import pathlib
import sys
import tracemalloc
import zipfile

import h5py
import numpy as np
import pytest

from densenet_jax import convert, predict, pretrained
from densenet_jax.pretrained import checkpoint, common

MB = 1 << 20


def write_npz(path: pathlib.Path, arrays: dict, zeros: dict) -> pathlib.Path:
  """An .npz with real `arrays` plus members of `zeros` (name -> shape) written as streamed,
  deflated float32 zeros: a few hundred KB on disk for any size in memory."""
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    for name, value in arrays.items():
      with archive.open(name + ".npy", "w") as f:
        np.lib.format.write_array(f, np.asarray(value))
    for name, shape in zeros.items():
      with archive.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        left, chunk = 4 * math.prod(shape), bytes(4 * MB)
        while left:
          f.write(chunk[:min(left, len(chunk))])
          left -= min(left, len(chunk))
  return path


def peak_bytes(fn) -> tuple[int, BaseException | None]:
  """Peak Python/numpy heap during fn() (numpy reports its buffers to tracemalloc)."""
  tracemalloc.start()
  error = None
  try:
    fn()
  except BaseException as e:  # noqa: BLE001 (returned for the test to inspect)
    error = e
  peak = tracemalloc.get_traced_memory()[1]
  tracemalloc.stop()
  return peak, error


def metadata(model: str, num_classes: int) -> np.ndarray:
  return np.array(json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION,
                              "model": model, "num_classes": num_classes,
                              "bn_epsilon": 1e-5}))


# ------------------------------------------------------------------ weight files

def test_a_compressed_checkpoint_is_checked_from_its_headers_before_reading(tmp_path):
  # 200 MB of zeros in a ~200 KB file, in place of densenet40's classifier kernel.
  path = write_npz(tmp_path / "bomb.npz", {checkpoint.METADATA_KEY: metadata("densenet40", 10)},
                   {"params/classifier/kernel": (50 * MB // 4 * 4,)})
  assert path.stat().st_size < 2 * MB
  peak, error = peak_bytes(lambda: pretrained.load(path))
  assert isinstance(error, ValueError), error
  assert f"checkpoint {path} does not fit densenet40 (1 shape mismatches" in str(error)
  assert "'params/classifier/kernel' (-> params/classifier/kernel) has shape (52428800,)" in (
      str(error))
  assert peak < 24 * MB, peak  # the array (200 MB) was never allocated


def test_a_checkpoint_claiming_a_huge_classifier_is_refused(tmp_path):
  path = write_npz(tmp_path / "classes.npz",
                   {checkpoint.METADATA_KEY: metadata("densenet40", 10**9)}, {})
  with pytest.raises(ValueError, match=r"has a classifier of 1000000000 classes, more than the "
                     r"100000 this reader accepts: refused before reading its arrays"):
    pretrained.read_checkpoint(path)


def test_a_compressed_state_dict_is_checked_from_its_headers_before_reading(tmp_path):
  path = write_npz(tmp_path / "sd.npz", {"features.norm0.weight": np.ones(3, np.float32)},
                   {"features.conv0.weight": (4 * MB, 3, 1, 1)})  # 48 MB of zeros
  peak, error = peak_bytes(lambda: pretrained.from_torchvision(path, "densenet40"))
  assert isinstance(error, ValueError), error
  assert "'features.conv0.weight' (-> params/conv0/kernel) has shape (1, 1, 3, 4194304) in " \
         "the file but densenet40 expects (3, 3, 3, 16)" in str(error)
  assert peak < 24 * MB, peak
  # More than the model's bound in all: refused from the headers' sizes alone.
  bound = common.size_bound("densenet40")
  big = write_npz(tmp_path / "big.npz", {}, {"features.conv0.weight": (bound // 4 + 1,)})
  peak, error = peak_bytes(lambda: pretrained.from_torchvision(big, "densenet40"))
  assert f"{big} holds arrays of more than {bound} bytes once expanded, more than weights of " \
         f"densenet40 can need: refused before reading them." == str(error)
  assert peak < 24 * MB, peak


def test_convert_without_a_model_bounds_by_the_largest_preset(tmp_path, capsys):
  bound = common.size_bound(common.LARGEST)
  big = write_npz(tmp_path / "big.npz", {}, {"features.conv0.weight": (bound // 4 + 1,)})
  peak, error = peak_bytes(lambda: convert.main(["--from", "torchvision", str(big),
                                                 str(tmp_path / "out.npz")]))
  assert error is None and peak < 24 * MB, (error, peak)
  assert f"more than weights of any preset ({common.LARGEST}, the largest) can need" in (
      capsys.readouterr().err)


def test_a_member_larger_than_its_header_says_is_refused(tmp_path):
  path = tmp_path / "padded.npz"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    with archive.open("features.conv0.weight.npy", "w") as f:
      np.lib.format.write_array(f, np.zeros(4, np.float32))
      f.write(bytes(MB))  # trailing data numpy would never read
  with pytest.raises(ValueError, match=r"member 'features.conv0.weight' declares \d+ bytes, "
                     r"but its shape \(4,\) of float32 needs 144: refused"):
    pretrained.read_torchvision(path)


def test_a_keras_archive_that_expands_past_the_model_is_refused_before_extracting(tmp_path):
  bound = common.size_bound("densenet40")
  path = tmp_path / "bomb.keras"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
    with archive.open("model.weights.h5", "w", force_zip64=True) as f:
      chunk = bytes(4 * MB)
      for _ in range(bound // len(chunk) + 1):
        f.write(chunk)
  assert path.stat().st_size < 2 * MB
  peak, error = peak_bytes(lambda: pretrained.from_keras(path, "densenet40"))
  assert isinstance(error, ValueError), error
  assert f"{path} holds model.weights.h5 of {(bound // (4 * MB) + 1) * 4 * MB} bytes once " \
         f"expanded, more than the {bound} that weights of densenet40 can need: refused " \
         f"before extracting it" in str(error)
  assert peak < 24 * MB, peak


def test_a_compressed_hdf5_dataset_past_the_model_is_refused_before_reading(tmp_path):
  path = tmp_path / "bomb.h5"
  with h5py.File(path, "w") as f:  # legacy layout; an unwritten chunked dataset is all fill
    f.attrs["layer_names"] = [b"conv1_conv"]
    group = f.create_group("conv1_conv")
    group.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
    group.create_dataset("conv1_conv/kernel:0", shape=(64 * MB,), dtype="f4", chunks=(MB,),
                         compression="gzip")
  assert path.stat().st_size < MB
  peak, error = peak_bytes(lambda: pretrained.from_keras(path, "densenet40"))
  assert isinstance(error, ValueError), error
  assert f"{path} holds datasets of more than {common.size_bound('densenet40')} bytes" in (
      str(error))
  assert "(/conv1_conv/conv1_conv/kernel:0 has shape (67108864,))" in str(error)
  assert peak < 24 * MB, peak
