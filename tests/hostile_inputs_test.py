"""Hostile weight files and images: small files that would expand to gigabytes are refused from
their headers, before anything is allocated; odd image sizes and modes are handled without
huge intermediates, and are read before any weights are downloaded; a missing optional package
names the extra that installs it."""

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
  """Peak Python/numpy heap during a second fn() (numpy reports its buffers to tracemalloc).

  The first call fills what JAX builds once per process (its backend, tracing caches: ~8 MB for
  a first model trace), which is not the reader's memory.
  """
  for measured in (False, True):
    if measured:
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


# ------------------------------------------------------------------ images

def reference_preprocess(image, resize=256, crop=224):
  """predict.preprocess as it was: the whole image resized, then centre-cropped."""
  from PIL import Image

  image = image.convert("RGB")
  w, h = image.size
  size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
  image = image.resize(size, Image.Resampling.BILINEAR)
  w, h = image.size
  left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
  x = np.asarray(image.crop((left, top, left + crop, top + crop)), np.float32) / 255.0
  return (x - np.asarray(predict.imagenet.MEAN, np.float32)) / np.asarray(
      predict.imagenet.STD, np.float32)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> pathlib.Path:
  """A random densenet40 checkpoint (10 classes), for the command line."""
  from densenet_jax import models

  model = models.get_model("densenet40")
  rng = np.random.default_rng(0)
  flat = {k: rng.normal(size=s.shape).astype(np.float32)
          for k, s in pretrained.flat_variable_shapes(model).items()}
  variables = pretrained.check_and_unflatten(flat, model, "test")
  path = tmp_path_factory.mktemp("ck") / "densenet40.npz"
  pretrained.save(path, "densenet40", model, variables, "torchvision")
  return path


def png_header_only(path: pathlib.Path, width: int, height: int) -> pathlib.Path:
  """A PNG that declares width x height RGB pixels and holds no pixel data: what Pillow reads
  at open time, a few dozen bytes."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") +
                   chunk(b"IEND", b""))
  return path


def test_an_image_over_the_pixel_limit_is_one_line_before_decoding(checkpoint_file, tmp_path,
                                                                   capsys):
  big = png_header_only(tmp_path / "big.png", 20000, 20000)
  assert predict.main(["--weights", str(checkpoint_file), str(big)]) == 2
  err = capsys.readouterr().err
  assert err == (f"predict: error: cannot read image {big}: 20000x20000 is 400,000,000 pixels, "
                 f"more than the limit of 89,478,485 (raise it with --max-pixels if the image "
                 f"is genuine)\n")
  with pytest.raises(ValueError, match="100x100 is 10,000 pixels, more than the limit of 9,999"):
    predict.open_image(png_header_only(tmp_path / "small.png", 100, 100), max_pixels=9999)
  # Raised past Pillow's own limit, the header passes; the missing pixel data is one line too.
  assert predict.main(["--weights", str(checkpoint_file), str(big),
                       "--max-pixels", str(10**9)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"predict: error: cannot read image {big}: ") and err.count("\n") == 1


def real_png(path: pathlib.Path) -> pathlib.Path:
  """A small RGB PNG that decodes."""
  from PIL import Image

  Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
  return path


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated"])
def test_a_bad_image_is_refused_before_the_weights_are_loaded(tmp_path, monkeypatch, capsys,
                                                              content):
  loads = []
  monkeypatch.setattr(pretrained, "load_with_metadata", lambda *a, **k: loads.append(a))
  bad = tmp_path / "bad.png"
  bad.write_bytes(content)
  # A registered name: offline, loading it would first report the failed download.
  assert predict.main(["--weights", "densenet121", str(real_png(tmp_path / "ok.png")),
                       str(bad)]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"predict: error: cannot read image {bad}: ") and err.count("\n") == 1
  assert not loads


def test_a_weights_path_that_is_a_directory_says_so(tmp_path, capsys):
  image = real_png(tmp_path / "ok.png")
  assert predict.main(["--weights", str(tmp_path), str(image)]) == 2
  assert capsys.readouterr().err == (
      f"predict: error: {tmp_path} is a directory, not a weight file: name the file in it.\n")


@pytest.mark.parametrize("flag", ["--crop", "--resize", "--top-k", "--max-pixels"])
def test_non_positive_sizes_are_one_line_usage_errors(checkpoint_file, tmp_path, capsys, flag):
  assert predict.main(["--weights", str(checkpoint_file), "x.png", flag, "0"]) == 2
  assert capsys.readouterr().err == f"predict: error: {flag} must be a positive number, not 0\n"


def test_preprocess_equals_resize_then_crop_bit_for_bit():
  from PIL import Image

  rng = np.random.default_rng(0)
  shapes = [(333, 517), (517, 333), (240, 260), (256, 256), (1000, 223), (223, 1000),
            (97, 131), (100, 1), (1, 100), (481, 640)]
  for shape in shapes:
    image = Image.fromarray(rng.integers(0, 256, shape + (3,), np.uint8))
    for resize, crop in [(256, 224), (320, 288), (100, 224), (32, 28), (256, 255)]:
      np.testing.assert_array_equal(predict.preprocess(image, resize, crop),
                                    reference_preprocess(image, resize, crop),
                                    err_msg=f"{shape} {resize} {crop}")


def test_a_long_thin_image_is_not_resized_whole():
  # The old path resized 1x2000 to 256x512000 (393 MB) before cropping; in a fresh process,
  # so the peak resident size is this call's.
  script = (
      "import resource, sys\n"
      "import numpy as np\n"
      "from PIL import Image\n"
      "from densenet_jax import predict\n"
      "image = Image.fromarray(np.arange(2000, dtype=np.uint8).reshape(2000, 1) * "
      "np.ones((1, 1, 3), np.uint8))\n"
      "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
      "x = predict.preprocess(image)\n"
      "assert x.shape == (224, 224, 3), x.shape\n"
      "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
  import subprocess
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                        cwd=pathlib.Path(__file__).resolve().parents[1])
  assert proc.returncode == 0, proc.stderr
  grown_kb = int(proc.stdout.split()[-1])
  assert grown_kb < 64 * 1024, grown_kb


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[..., None], 3, axis=-1)


def _muldiv255(a, b):
  t = a.astype(np.int64) * b + 128
  return ((t >> 8) + t) >> 8


def _cases():
  """mode -> (array or builder, expected 8-bit RGB), each reference computed by hand."""
  rng = np.random.default_rng(1)
  g16 = rng.integers(0, 65536, (5, 7), np.uint16)
  g16_in_8 = np.rint(g16.astype(np.float64) * 255 / 65535)
  fl = rng.uniform(0, 1, (5, 7)).astype(np.float32)
  palette = rng.integers(0, 256, (256, 3), np.uint8)
  index = rng.integers(0, 256, (5, 7), np.uint8)
  cmyk = rng.integers(0, 256, (5, 7, 4), np.uint8)
  la = rng.integers(0, 256, (5, 7, 2), np.uint8)
  rgba = rng.integers(0, 256, (5, 7, 4), np.uint8)
  nk = 255 - cmyk[..., 3:].astype(np.int64)
  return {
      "I;16": (lambda I: I.fromarray(g16), _grey_rgb(g16_in_8)),
      "I": (lambda I: I.fromarray(g16.astype(np.int32)), _grey_rgb(g16_in_8)),
      "F": (lambda I: I.fromarray(fl), _grey_rgb(np.rint(fl.astype(np.float64) * 255))),
      "P": (lambda I: _palette(I, index, palette), palette[index]),
      "CMYK": (lambda I: I.fromarray(cmyk, "CMYK"), nk - _muldiv255(cmyk[..., :3], nk)),
      "LA": (lambda I: I.fromarray(la, "LA"), _grey_rgb(la[..., 0])),
      "RGBA": (lambda I: I.fromarray(rgba, "RGBA"), rgba[..., :3]),
  }


def _palette(Image, index, palette):
  image = Image.frombytes("P", index.shape[::-1], index.tobytes())
  image.putpalette(palette.tobytes())
  return image


@pytest.mark.parametrize("mode", list(_cases()))
def test_every_mode_maps_to_8_bit_rgb_by_scaling(mode):
  from PIL import Image

  build, expected = _cases()[mode]
  image = build(Image)
  assert image.mode == mode
  rgb = predict.to_rgb(image)
  assert rgb.mode == "RGB"
  np.testing.assert_array_equal(np.asarray(rgb), expected.astype(np.uint8))
  # And the whole transform sees those pixels.
  np.testing.assert_array_equal(predict.preprocess(image, 8, 6),
                                predict.preprocess(Image.fromarray(expected.astype(np.uint8)),
                                                   8, 6))


# ------------------------------------------------------------------ missing optional packages

INSTALL = "pip install -e '.[weights]'"


def test_without_safetensors_predict_and_convert_name_the_extra(tmp_path, monkeypatch, capsys):
  for module in ("safetensors", "safetensors.numpy"):
    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed
  monkeypatch.setenv("DENSENET_JAX_CACHE", str(tmp_path / "cache"))
  image = real_png(tmp_path / "x.png")
  assert predict.main(["--weights", "densenet121", str(image)]) == 1
  err = capsys.readouterr().err
  assert err == (f"predict: error: Loading 'densenet121' (densenet121.tv_in1k.safetensors) needs "
                 f"the 'safetensors' package, which the [weights] extra installs: {INSTALL} (or "
                 f"pip install safetensors).\n")
  assert not (tmp_path / "cache" / "downloads").exists()  # refused before downloading
  (tmp_path / "w.safetensors").write_bytes(b"")
  assert convert.main(["--from", "torchvision", "--model", "densenet121",
                       str(tmp_path / "w.safetensors"), str(tmp_path / "out.npz")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("convert: error: Reading w.safetensors needs the 'safetensors' package")
  assert INSTALL in err and err.count("\n") == 1


def test_without_h5py_or_pillow_the_extra_is_named(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "h5py", None)
  (tmp_path / "w.h5").write_bytes(b"")
  assert convert.main(["--from", "keras", str(tmp_path / "w.h5"), str(tmp_path / "o.npz")]) == 1
  assert f"Reading Keras weights needs the 'h5py' package, which the [weights] extra installs: " \
         f"{INSTALL}" in capsys.readouterr().err
  for module in ("PIL", "PIL.Image"):
    monkeypatch.setitem(sys.modules, module, None)
  assert predict.main(["--weights", "x.npz", "x.png"]) == 1
  assert capsys.readouterr().err == (
      f"predict: error: Reading images needs the 'pillow' package, which the [weights] extra "
      f"installs: {INSTALL} (or pip install pillow).\n")
