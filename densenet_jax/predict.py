"""Classifies images with pretrained weights and prints the top-5 ImageNet labels.

    python -m densenet_jax.predict --weights densenet121 cat.jpg dog.png
    python -m densenet_jax.predict --weights my_checkpoint.npz cat.jpg

--weights is a registered name (downloaded, verified and cached on first use; see
densenet_jax.pretrained.hub) or a checkpoint from densenet_jax.convert. Preprocessing is
torchvision's ImageNet evaluation transform (densenet_jax.imagenet: resize the shorter side to
256 with bilinear interpolation, centre-crop 224, scale to [0, 1], normalise with the ImageNet
mean and std), which is also what keras.applications.densenet.preprocess_input ('torch' mode)
does. Label names ship with the package (densenet_jax/imagenet_labels.txt).

Every image is read before the weights are loaded (a download, the first time), so a bad
image fails at once. Images larger than --max-pixels are refused from their header, before
decoding. Only the region the centre crop keeps is resized, so a very long thin image costs no
more than a square one. 16-bit and float greyscale images are scaled to 8 bits (not clipped, as
Pillow's convert("RGB") does); alpha is dropped, as torchvision's and Keras' loaders do.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import numpy as np

from densenet_jax import imagenet, pretrained
from densenet_jax.pretrained import common

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (about 9459 x 9459)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow opens 16-bit greyscale so


def _pil() -> Any:
  """PIL.Image, or an ImportError naming the extra that installs Pillow."""
  return common.require("PIL.Image", "Reading images", package="pillow")


def open_image(path: common.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
  """Opens an image lazily (header only); a ValueError if it has more than max_pixels."""
  Image = _pil()
  # Pillow's own limit is a process-wide setting that raises a multi-line-traceback error of
  # its own: off only while the header is read, the exact size is checked right after.
  limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
  try:
    image = Image.open(path)
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  w, h = image.size
  if w * h > max_pixels:
    image.close()
    raise ValueError(f"{w}x{h} is {w * h:,} pixels, more than the limit of {max_pixels:,} "
                     f"(raise it with --max-pixels if the image is genuine)")
  return image


def to_rgb(image: Any) -> Any:
  """An 8-bit RGB PIL image: 16-bit ('I;16', 'I') greyscale scaled from 0..65535 and float
  ('F') from 0..1 to 0..255; other modes (palette, CMYK, LA, RGBA, ...) by Pillow's
  convert("RGB"), which drops alpha as torchvision's and Keras' loaders do."""
  Image = _pil()
  if image.mode == "RGB":
    return image
  if image.mode in _SIXTEEN_BIT:
    x = np.clip(np.asarray(image, np.float64), 0, 65535) * (255 / 65535)
  elif image.mode == "F":
    x = np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0, 1) * 255
  else:
    return image.convert("RGB")
  return Image.fromarray(np.rint(x).astype(np.uint8), "L").convert("RGB")


def preprocess(image: Any, resize: int = imagenet.RESIZE, crop: int = imagenet.CROP,
               mean: Sequence[float] = imagenet.MEAN,
               std: Sequence[float] = imagenet.STD) -> np.ndarray:
  """A PIL image -> (crop, crop, 3) float32, as torchvision's Resize+CenterCrop+Normalize."""
  return normalize(resize_and_crop(image, resize, crop), mean, std)


def resize_and_crop(image: Any, resize: int = imagenet.RESIZE,
                    crop: int = imagenet.CROP) -> np.ndarray:
  """A PIL image -> (crop, crop, 3) uint8 RGB, as torchvision's Resize+CenterCrop."""
  _pil()  # Pillow is there, or one line naming the extra
  if resize < 1 or crop < 1:
    raise ValueError(f"resize and crop must be at least 1 pixel, not {resize} and {crop}")
  image = to_rgb(image)
  w, h = image.size
  # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is truncated.
  if w <= h:
    size = (resize, int(resize * h / w))
  else:
    size = (int(resize * w / h), resize)
  # Resize only what the centre crop keeps: Pillow's bilinear resize evaluated at the kept
  # output pixels alone, bit for bit (see _resize_crop), so a 1x10000 image no longer becomes
  # a 256x2560000 intermediate.
  return _resize_crop(np.asarray(image), size, crop)


def normalize(pixels: np.ndarray, mean: Sequence[float] = imagenet.MEAN,
              std: Sequence[float] = imagenet.STD) -> np.ndarray:
  """uint8 RGB pixels -> float32 scaled to [0, 1], minus `mean`, divided by `std`."""
  x = pixels.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _resize_crop(pixels: np.ndarray, size: tuple[int, int], crop: int) -> np.ndarray:
  """(crop, crop, 3) uint8: Pillow's Image.resize(size, BILINEAR) then centre crop (zeros
  where the crop is larger), computing only the kept pixels and the rows they read."""
  h, w = pixels.shape[:2]
  (x_first, x_count, x_pad), (y_first, y_count, y_pad) = (
      _crop_span(size[0], crop), _crop_span(size[1], crop))
  y_start, y_weights = _coefficients(h, size[1], y_first, y_count)
  x_start, x_weights = _coefficients(w, size[0], x_first, x_count)
  # Two passes rounded to 8 bits in between, in Pillow's order: vertical first only when the
  # height shrinks by more than twice as many pixels as the width. The first pass reads only
  # the rows (or columns) that the second one needs.
  if not (h - size[1] > 0 and h - size[1] > (w - size[0]) * 2):
    top, bottom = int(y_start.min()), int(y_start.max()) + y_weights.shape[1]
    rows = _pass(pixels[top:min(bottom, h)], x_start, x_weights, axis=1)
    kept = _pass(rows, y_start - top, y_weights, axis=0)
  else:
    left, right = int(x_start.min()), int(x_start.max()) + x_weights.shape[1]
    columns = _pass(pixels[:, left:min(right, w)], y_start, y_weights, axis=0)
    kept = _pass(columns, x_start - left, x_weights, axis=1)
  out = np.zeros((crop, crop, pixels.shape[2]), np.uint8)
  out[y_pad:y_pad + y_count, x_pad:x_pad + x_count] = kept
  return out


def _crop_span(resized: int, crop: int) -> tuple[int, int, int]:
  """One axis of the centre crop of a resized length: (first kept index, count, padding)."""
  left = int(round((resized - crop) / 2.0))  # as the crop box of the full resize-then-crop
  first, last = max(left, 0), min(left + crop, resized)
  return first, last - first, first - left


_PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit resampling (Resample.c)


def _coefficients(source: int, resized: int, first: int, count: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's bilinear coefficients for outputs first..first+count-1 of a source -> resized
  resize: each output's first source index and its fixed-point weights (precompute_coeffs and
  normalize_coeffs_8bpc in Pillow's Resample.c, the same double arithmetic in the same order,
  so the results are identical). Not Pillow's own resize with a box: it takes the box in
  single precision, which moves sample positions enough to change about 1 pixel in 1000."""
  scale = source / resized
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale  # the bilinear filter's support is 1
  ksize = int(np.ceil(support)) * 2 + 1
  center = 0.0 + (np.arange(first, first + count) + 0.5) * scale
  start = np.maximum((center - support + 0.5).astype(np.int64), 0)  # C's (int) truncates
  length = np.minimum((center + support + 0.5).astype(np.int64), source) - start
  x = np.arange(ksize)
  t = np.abs(((x[None, :] + start[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale))
  weights = np.where((t < 1.0) & (x[None, :] < length[:, None]), 1.0 - t, 0.0)
  total = np.zeros(count)
  for j in range(ksize):  # summed left to right, as the C loop does
    total += weights[:, j]
  weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0, 1, total)[:, None],
                     weights)
  return start, np.trunc(0.5 + weights * (1 << _PRECISION_BITS)).astype(np.int64)


def _pass(pixels: np.ndarray, start: np.ndarray, weights: np.ndarray, axis: int) -> np.ndarray:
  """One resampling pass along axis 0 or 1 in Pillow's integer arithmetic, as uint8."""
  limit = pixels.shape[axis] - 1
  acc = np.full((), 1 << (_PRECISION_BITS - 1), np.int64)
  for j in range(weights.shape[1]):  # one tap at a time: no (out, taps, ...) temporary
    index = np.minimum(start + j, limit)  # a zero weight where the tap is past the edge
    taps = pixels[index] if axis == 0 else pixels[:, index]
    k = weights[:, j].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
    acc = acc + taps.astype(np.int64) * k
  return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def top_k(probs: np.ndarray, labels: Sequence[str] | None, k: int) -> list[tuple[float, str]]:
  """(probability, label) of the k most likely classes of one image."""
  order = np.argsort(-probs)[:k]
  return [(float(probs[i]), labels[i] if labels else f"class {i}") for i in order]


def main(argv: list[str] | None = None) -> int:
  """Reads every image, loads the weights, classifies the images in one batch, prints the
  top-k of each.

  Exit status: 0 done, 2 a bad argument or input file, 1 a failure of the environment (a
  download, a missing package).
  """
  parser = argparse.ArgumentParser(prog="python -m densenet_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", required=True,
                      help=f"a checkpoint file or one of: {', '.join(pretrained.REGISTRY)}")
  parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--crop", type=int, default=imagenet.CROP, help="centre crop size")
  parser.add_argument("--resize", type=int, default=None,
                      help="shorter side before cropping (default: crop / 0.875)")
  parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help="refuse larger images before decoding them (default: %(default)s)")
  args = parser.parse_args(argv)
  for flag, value in (("--crop", args.crop), ("--resize", args.resize),
                      ("--top-k", args.top_k), ("--max-pixels", args.max_pixels)):
    if value is not None and value < 1:
      print(f"predict: error: {flag} must be a positive number, not {value}", file=sys.stderr)
      return 2
  resize = args.resize if args.resize is not None else imagenet.resize_for_crop(args.crop)
  try:
    _pil()
  except ImportError as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 1
  crops = []  # read before the weights, which may be a download
  for path in args.images:
    try:
      with open_image(path, args.max_pixels) as image:
        crops.append(resize_and_crop(image, resize, args.crop))
    # Pillow's decoders signal broken files with any of these (UnidentifiedImageError is an
    # OSError; some plugins raise SyntaxError or EOFError).
    except (OSError, ValueError, SyntaxError, EOFError) as e:
      print(f"predict: error: cannot read image {path}: {e}", file=sys.stderr)
      return 2
  try:
    model, variables, metadata = pretrained.load_with_metadata(args.weights)
  except (ImportError, pretrained.WeightsError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  if model.num_classes == 0:
    print(f"predict: error: {args.weights} has no classifier (a headless backbone).",
          file=sys.stderr)
    return 2
  batch = np.stack([normalize(c, metadata["mean"], metadata["std"]) for c in crops])
  probs = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))(variables, batch)
  labels = imagenet.labels() if model.num_classes == 1000 else None
  for path, p in zip(args.images, np.asarray(probs)):
    print(path)
    for prob, label in top_k(p, labels, args.top_k):
      print(f"  {prob:.4f}  {label}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
