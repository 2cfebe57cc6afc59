"""Classifies images with a converted checkpoint and prints the top-5 ImageNet labels.

    python -m densenet_jax.predict --weights densenet121.npz cat.jpg dog.png

Preprocessing is torchvision's ImageNet evaluation transform (resize the shorter side to
256, centre-crop 224, scale to [0, 1], normalise with the ImageNet mean and std), which is
also what keras.applications.densenet.preprocess_input ('torch' mode) does. Label names come
from files that tensorflow_datasets ships (no download); without it, 'class N' is printed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import pathlib
import sys
from typing import Any, Sequence

import jax
import numpy as np

from densenet_jax import pretrained


def preprocess(image: Any, resize: int = 256, crop: int = 224,
               mean: Sequence[float] = pretrained.IMAGENET_MEAN,
               std: Sequence[float] = pretrained.IMAGENET_STD) -> np.ndarray:
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


def imagenet_labels() -> list[str] | None:
  """The 1000 ImageNet-2012 labels 'wnid name' in class-index order, from tfds's files."""
  spec = importlib.util.find_spec("tensorflow_datasets")  # locates without importing TF
  if spec is None or not spec.submodule_search_locations:
    return None
  root = pathlib.Path(list(spec.submodule_search_locations)[0])
  try:
    wnids = (root / "datasets/imagenet2012/labels.txt").read_text().split()
    # tfds's label feature holds only WordNet ids; the readable names (same class order) ship
    # as a Python list in the SI-Score dataset, read here without importing tfds.
    tree = ast.parse((root / "datasets/siscore/labels.py").read_text())
    names = next(ast.literal_eval(node.value) for node in ast.walk(tree)
                 if isinstance(node, ast.Assign) and
                 getattr(node.targets[0], "id", "") == "IMAGENET_LABELS_LIST")
  except (OSError, StopIteration, SyntaxError, ValueError):
    return None
  if len(wnids) != 1000 or len(names) != 1000:
    return None
  return [f"{wnid} {name}" for wnid, name in zip(wnids, names)]


def top_k(probs: np.ndarray, labels: Sequence[str] | None, k: int) -> list[tuple[float, str]]:
  """(probability, label) of the k most likely classes of one image."""
  order = np.argsort(-probs)[:k]
  return [(float(probs[i]), labels[i] if labels else f"class {i}") for i in order]


def main(argv: list[str] | None = None) -> int:
  """Loads the checkpoint, classifies every image in one batch, prints the top-k of each."""
  parser = argparse.ArgumentParser(prog="python -m densenet_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--weights", required=True, help="a checkpoint from densenet_jax.convert")
  parser.add_argument("images", nargs="+", help="image files (anything Pillow reads)")
  parser.add_argument("--top-k", type=int, default=5)
  parser.add_argument("--resize", type=int, default=256, help="shorter side before cropping")
  parser.add_argument("--crop", type=int, default=224, help="centre crop size")
  args = parser.parse_args(argv)
  from PIL import Image, UnidentifiedImageError

  try:
    model, variables, metadata = pretrained.load_with_metadata(args.weights)
  except (ValueError, OSError) as e:
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
        batch.append(preprocess(image, args.resize, args.crop, metadata["mean"],
                                metadata["std"]))
    except (OSError, UnidentifiedImageError) as e:
      print(f"predict: error: cannot read image {path}: {e}", file=sys.stderr)
      return 2
  probs = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x)))(variables, np.stack(batch))
  labels = imagenet_labels() if model.num_classes == 1000 else None
  for path, p in zip(args.images, np.asarray(probs)):
    print(path)
    for prob, label in top_k(p, labels, args.top_k):
      print(f"  {prob:.4f}  {label}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
