"""Classifies images with pretrained weights and prints the top-5 ImageNet labels.

    python -m densenet_jax.predict --weights densenet121 cat.jpg dog.png
    python -m densenet_jax.predict --weights my_checkpoint.npz cat.jpg

--weights is a registered name (downloaded, verified and cached on first use; see
densenet_jax.pretrained.hub) or a checkpoint from densenet_jax.convert. Preprocessing is
torchvision's ImageNet evaluation transform (densenet_jax.imagenet: resize the shorter side to
256 with bilinear interpolation, centre-crop 224, scale to [0, 1], normalise with the ImageNet
mean and std), which is also what keras.applications.densenet.preprocess_input ('torch' mode)
does. Label names ship with the package (densenet_jax/imagenet_labels.txt).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import jax
import numpy as np

from densenet_jax import imagenet, pretrained


def preprocess(image: Any, resize: int = imagenet.RESIZE, crop: int = imagenet.CROP,
               mean: Sequence[float] = imagenet.MEAN,
               std: Sequence[float] = imagenet.STD) -> np.ndarray:
  """A PIL image -> (crop, crop, 3) float32, as torchvision's Resize+CenterCrop+Normalize."""
  from PIL import Image

  image = image.convert("RGB")
  w, h = image.size
  # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is truncated.
  if w <= h:
    size = (resize, int(resize * h / w))
  else:
    size = (int(resize * w / h), resize)
  image = image.resize(size, Image.Resampling.BILINEAR)
  w, h = image.size
  left, top = int(round((w - crop) / 2.0)), int(round((h - crop) / 2.0))
  image = image.crop((left, top, left + crop, top + crop))
  x = np.asarray(image, np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def top_k(probs: np.ndarray, labels: Sequence[str] | None, k: int) -> list[tuple[float, str]]:
  """(probability, label) of the k most likely classes of one image."""
  order = np.argsort(-probs)[:k]
  return [(float(probs[i]), labels[i] if labels else f"class {i}") for i in order]


def main(argv: list[str] | None = None) -> int:
  """Loads the weights, classifies every image in one batch, prints the top-k of each."""
  parser = argparse.ArgumentParser(prog="python -m densenet_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", required=True,
                      help=f"a checkpoint file or one of: {', '.join(pretrained.REGISTRY)}")
  parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--crop", type=int, default=imagenet.CROP, help="centre crop size")
  parser.add_argument("--resize", type=int, default=None,
                      help="shorter side before cropping (default: crop / 0.875)")
  args = parser.parse_args(argv)
  resize = args.resize or imagenet.resize_for_crop(args.crop)
  from PIL import Image, UnidentifiedImageError

  try:
    model, variables, metadata = pretrained.load_with_metadata(args.weights)
  except (ValueError, ImportError, OSError, pretrained.WeightsError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    return 2
  if model.num_classes == 0:
    print(f"predict: error: {args.weights} has no classifier (a headless backbone).",
          file=sys.stderr)
    return 2
  batch = []
  for path in args.images:
    try:
      with Image.open(path) as image:
        batch.append(preprocess(image, resize, args.crop, metadata["mean"], metadata["std"]))
    except (OSError, UnidentifiedImageError) as e:
      print(f"predict: error: cannot read image {path}: {e}", file=sys.stderr)
      return 2
  probs = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))(variables, np.stack(batch))
  labels = imagenet.labels() if model.num_classes == 1000 else None
  for path, p in zip(args.images, np.asarray(probs)):
    print(path)
    for prob, label in top_k(p, labels, args.top_k):
      print(f"  {prob:.4f}  {label}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
