"""ImageNet conventions in one place: normalisation, the evaluation transform, class labels.

torchvision's DenseNet weights were trained and evaluated with these (and Keras' DenseNet
`preprocess_input` is the same 'torch' mode): pixels / 255, minus MEAN, divided by STD; for
evaluation, resize the shorter side to RESIZE with bilinear interpolation, centre-crop CROP.
`densenet_jax.predict` (Pillow) and the trainer's ImageNet evaluation (tf.data) both follow
this spec, so a converted checkpoint is evaluated the way it was published.
"""

from __future__ import annotations

import importlib.resources

MEAN = (0.485, 0.456, 0.406)  # per channel, pixels scaled to [0, 1]
STD = (0.229, 0.224, 0.225)
MEAN_255 = tuple(round(m * 255, 6) for m in MEAN)  # the same, for 0..255 pixels
STD_255 = tuple(round(s * 255, 6) for s in STD)

RESIZE = 256  # shorter side before the centre crop (= CROP / 0.875)
CROP = 224


def resize_for_crop(crop: int) -> int:
  """The shorter-side size for a centre crop of `crop` (256 for 224: the 0.875 rule)."""
  return int(round(crop * RESIZE / CROP))


def labels() -> list[str]:
  """The 1000 ImageNet-2012 class labels, 'wnid name' in class-index order.

  Shipped as package data (imagenet_labels.txt), generated once from the files
  tensorflow_datasets ships: imagenet2012/labels.txt (WordNet ids) and siscore/labels.py
  (the readable names, same order).
  """
  text = importlib.resources.files("densenet_jax").joinpath("imagenet_labels.txt").read_text()
  return text.splitlines()
