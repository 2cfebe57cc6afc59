"""DenseNet (L=40, k=12) on CIFAR-10: 5.24% error with augmentation (C10+), 7.00% without.

`--config=configs/cifar_densenet40.py:noaug` selects the un-augmented variant with dropout 0.2.

Devices: 1, 2, 4, 8, 16, 32, 64 (the global batch of 64 must divide evenly; elsewhere set
batch_size and learning_rate as the error message suggests).
"""

from configs import default


def get_config(variant: str = "aug"):
  """`aug` (C10+, the default) or `noaug` (C10: no augmentation, dropout 0.2)."""
  if variant not in ("aug", "noaug"):
    raise ValueError(f"cifar_densenet40 variant must be 'aug' or 'noaug', got {variant!r}")
  c = default.get_config()
  c.model = "densenet40"
  if variant == "noaug":
    c.augment = "none"
    c.model_overrides.drop_rate = 0.2
  return c
